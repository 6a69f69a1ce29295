"""ControlNet / T2I-Adapter hints cut to the frames of one TokenFlow pass."""
from __future__ import annotations

import contextlib

import torch


def controls(conds: dict) -> list:
    """Every ControlNet / T2I-Adapter object in a guider's conds, chains included, once each."""
    seen = {}
    for cond_list in conds.values():
        for c in cond_list or ():
            control = c.get("control") if isinstance(c, dict) else None
            while control is not None and id(control) not in seen:
                seen[id(control)] = control
                control = getattr(control, "previous_controlnet", None)
    return list(seen.values())


@contextlib.contextmanager
def frame_hints(conds: dict, frames, num_frames: int):
    """Give a pass over some of the clip's frames those frames' control hints.

    ComfyUI fits a hint batch to a UNet call by taking its first rows, which is right when a
    sampler sees every frame at once. TokenFlow's passes see a subset (the keyframes, then each
    batch), so a hint with one image per frame is cut to ``frames`` for the pass and put back
    afterwards (the control objects belong to the conditioning, which ComfyUI caches). A single
    hint image, or a hint batch of another length, is left to ComfyUI.
    """
    saved = []
    if num_frames > 1:
        for control in controls(conds):
            hint = getattr(control, "cond_hint_original", None)
            if isinstance(hint, torch.Tensor) and hint.shape[0] == num_frames:
                saved.append((control, hint))
                control.cond_hint_original = hint[frames]
                control.cond_hint = None  # recomputed from the frames' hints by get_control
    try:
        yield
    finally:
        for control, hint in saved:
            control.cond_hint_original = hint
            control.cond_hint = None
