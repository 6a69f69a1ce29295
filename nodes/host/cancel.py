"""Cancel: ComfyUI's interruption, noticed inside the pack's long loops."""
from __future__ import annotations


def interrupted() -> None:
    """Raise ComfyUI's interruption if the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
