"""STEM inversion and TokenFlow editing on plain tensors.

Pure torch/einops/numpy/opencv: nothing in this package imports ComfyUI, so every
function here can be tested and reused without the host. REFERENCE.md (kept beside the
project as ../shared/REFERENCE.md) is the spec; section numbers in docstrings point there.
"""
