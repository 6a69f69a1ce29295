"""A ComfyUI test bed shared by tests/ and benchmarks/: ComfyUI in this process on the CPU with
this repository loaded as a custom node pack (``comfyui``), random-weight models with the real
architectures (``models``), and synthetic clips (``clips``). Not part of the pack: ComfyUI never
imports it.
"""
