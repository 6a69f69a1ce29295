"""The DDIM run: the reference schedule on the model's noise levels, and the loops of stem.ddim
as ComfyUI samplers.

The loops themselves live once, in ``stem.ddim``; here they get ComfyUI's model function
(a k-diffusion denoiser), Cancel between UNet calls, and the sampler callback that draws
latent previews. Sampling goes through ComfyUI's own guider, so conditioning, LoRA, FreeU and
ControlNet take their normal path.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...stem.ddim import DDIMSchedule, abar_from_sigma, ddim_invert, ddim_sample, ddim_timesteps, eps_from_denoised
from ...stem.inversion import Inversion
from .cancel import interrupted
from .pack import StemError


def model_schedule(model, steps: int) -> DDIMSchedule:
    """The reference DDIM schedule on the model's own noise levels (REFERENCE §2)."""
    ms = model.get_model_object("model_sampling")
    return DDIMSchedule.create(steps, abar_from_sigma(ms.sigmas.double().cpu()))


def edit_levels(inv: Inversion, steps: int) -> tuple[list[int], list[float]]:
    """Editing timesteps (noisiest first) and their levels plus the final one, taken from the
    inversion so that the source branch always has its latent at the same level."""
    ts = ddim_timesteps(steps)
    missing = [t for t in ts if t not in inv.timesteps]
    if missing:
        raise StemError(
            f"steps: {steps} editing steps need timesteps {missing[:4]}... that the {inv.steps}-step inversion "
            f"does not have; use {inv.steps} steps, or a count whose spacing is a multiple of the inversion's "
            f"(e.g. {inv.steps // 2 if inv.steps % 2 == 0 else inv.steps})"
        )
    sig = inv.sigmas.tolist()
    levels = [sig[1 + inv.timesteps.index(t)] for t in ts] + [sig[0]]
    return ts, levels


def _eps_fn(model, x: torch.Tensor, extra_args: dict):
    """ComfyUI's denoiser ``model(x, sigma * s_in, **extra_args)`` as stem.ddim's eps function,
    checking for Cancel before every UNet call."""
    s_in = x.new_ones([x.shape[0]])

    def eps_fn(x_in: torch.Tensor, sigma: float) -> torch.Tensor:
        interrupted()
        return eps_from_denoised(x_in, model(x_in, sigma * s_in, **extra_args), sigma)

    return eps_fn


def _comfy_callback(callback, sigmas):
    if callback is None:
        return None

    def on_step(i: int, x: torch.Tensor, x0_hat: torch.Tensor) -> None:
        s = float(sigmas[i])
        callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": x0_hat})

    return on_step


def inversion_sampler(keep: Callable[[int, torch.Tensor], torch.Tensor]):
    """A KSAMPLER that runs :func:`stem.ddim.ddim_invert` over rising ``sigmas``
    (``DDIMSchedule.inversion_sigmas``); the latent it gets is the clean one, and ``keep`` stores
    every step's latent (the trajectory the edit reads) and returns it as stored, the latent the
    next step continues from."""
    import comfy.samplers

    @torch.no_grad()
    def sample_stem_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
        levels = [float(s) for s in sigmas]
        return ddim_invert(x, _eps_fn(model, x, extra_args or {}), levels, _comfy_callback(callback, levels[1:]), keep)

    return comfy.samplers.KSAMPLER(sample_stem_ddim_inversion)


def ddim_sampler(keep: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
    """A KSAMPLER that runs :func:`stem.ddim.ddim_sample` over falling ``sigmas``
    (``DDIMSchedule.sampling_sigmas``) and returns the VP latent at the last level, which is
    what the reference decodes (REFERENCE §3); ``keep(i, x)`` gives the latent step i+1 starts
    from."""
    import comfy.samplers

    @torch.no_grad()
    def sample_stem_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
        levels = [float(s) for s in sigmas]
        return ddim_sample(x, _eps_fn(model, x, extra_args or {}), levels, _comfy_callback(callback, levels), keep)

    return comfy.samplers.KSAMPLER(sample_stem_ddim)


def preview_callback(model, steps: int):
    """ComfyUI's own step callback: the progress bar and latent previews, one tick a step."""
    import latent_preview

    return latent_preview.prepare_callback(model, steps)
