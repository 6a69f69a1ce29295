"""Free memory as the host counts it, and sizes for messages."""
from __future__ import annotations

import contextlib

import torch

from ...stem.allocator import return_free_memory


def free_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes free for new work on ``device`` (default: ComfyUI's torch device), from
    ``comfy.model_management.get_free_memory``: the driver's free memory plus what torch has
    cached on a GPU, the available RAM on the CPU. None when the host cannot tell."""
    import comfy.model_management as mm

    try:
        return int(mm.get_free_memory(torch.device(device) if device is not None else None))
    except Exception:  # a backend without a memory query: callers go on without a check
        return None


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def returning_memory():
    """Around a node's long run: however it ends (done, cancelled, failed), the memory it freed
    goes back to the system (``stem.allocator.return_free_memory``), so the server's resident memory
    is back at its level before the run."""
    try:
        yield
    finally:
        return_free_memory()
