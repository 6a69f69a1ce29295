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
    with interleaved_hints(conds, [frames], num_frames) as entering:
        entering(0)
        yield


@contextlib.contextmanager
def interleaved_hints(conds: dict, groups: list, num_frames: int):
    """:func:`frame_hints` for passes whose UNet calls run interleaved (keyframes in several
    passes): yields ``entering(i)``, to be called whenever pass i is about to compute,
    which gives the controls pass i's frames (``groups[i]``) of the hints and its own prepared
    hint (ControlNet keeps the hint it prepared for a call and reuses it while the shapes match;
    a pass's is recomputed from its frames' hints by get_control the first time)."""
    clip = []
    if num_frames > 1:
        for control in controls(conds):
            hint = getattr(control, "cond_hint_original", None)
            if isinstance(hint, torch.Tensor) and hint.shape[0] == num_frames:
                clip.append((control, hint, [None] * len(groups)))
    current = [None]

    def entering(i: int) -> None:
        for control, hint, prepared in clip:
            if current[0] is not None:
                prepared[current[0]] = control.cond_hint
            control.cond_hint_original = hint[groups[i]]
            control.cond_hint = prepared[i]
        current[0] = i

    try:
        yield entering
    finally:
        for control, hint, _ in clip:
            control.cond_hint_original = hint
            control.cond_hint = None
