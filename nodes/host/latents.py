"""LATENT and CONDITIONING values as the STEM nodes take and store them."""
from __future__ import annotations

import logging

import torch

from ...stem.inversion import Inversion
from .pack import StemError

log = logging.getLogger("ComfyUI-STEM")


def latent_frames(latent: dict, input_name: str = "latent") -> torch.Tensor:
    """The ``[frames, C, h, w]`` samples of a LATENT, refusing video-model latents."""
    samples = latent["samples"]
    if samples.ndim != 4:
        raise StemError(f"{input_name}: expected image latents [frames, C, h, w], got shape {tuple(samples.shape)}; "
                        "encode the frames with VAE Encode")
    if latent.get("batch_index") is not None or latent.get("noise_mask") is not None:
        log.warning("STEM: the latent's batch_index / noise_mask are ignored")
    return samples


# SDXL's size and crop conditioning (CLIP Text Encode SDXL), kept with an inversion's prompt
SIZE_CONDITIONING = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def single_cond(conditioning, input_name: str):
    """The tensor, pooled output and SDXL size conditioning (a dict of numbers) of a one-entry
    CONDITIONING, for storing with an inversion."""
    if not conditioning:
        raise StemError(f"{input_name}: the conditioning is empty; connect a CLIP Text Encode")
    cond, extras = conditioning[0][0], conditioning[0][1]
    sizes = {k: int(extras[k]) for k in SIZE_CONDITIONING if isinstance(extras.get(k), (int, float))}
    return cond, extras.get("pooled_output"), sizes


def inversion_conditioning(inv: Inversion):
    """The source prompt's CONDITIONING stored with an inversion."""
    if inv.cond is None:
        raise StemError("the inversion carries no source conditioning; connect source_conditioning")
    extras = {} if inv.pooled is None else {"pooled_output": inv.pooled}
    extras.update(inv.settings.get("size_conditioning") or {})
    return [[inv.cond, extras]]
