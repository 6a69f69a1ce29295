"""The DDIM loops of stem.ddim as ComfyUI samplers, and progress with previews.

The loops themselves live once, in ``stem.ddim``; here they get ComfyUI's model function
(a k-diffusion denoiser), Cancel between UNet calls, and the sampler callback that draws
latent previews. Sampling goes through ComfyUI's own guider, so conditioning, LoRA, FreeU and
ControlNet take their normal path.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..stem.ddim import ddim_invert, ddim_sample, eps_from_denoised
from .host_model import interrupted


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


def inversion_sampler(record: Callable[[int, torch.Tensor], None]):
    """A KSAMPLER that runs :func:`stem.ddim.ddim_invert` over rising ``sigmas``
    (``DDIMSchedule.inversion_sigmas``); the latent it gets is the clean one, and ``record``
    receives every step's latent (the trajectory the edit reads)."""
    import comfy.samplers

    @torch.no_grad()
    def sample_stem_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
        levels = [float(s) for s in sigmas]
        preview = _comfy_callback(callback, levels[1:])

        def on_step(i, x_i, x0_hat):
            record(i, x_i)
            if preview is not None:
                preview(i, x_i, x0_hat)

        return ddim_invert(x, _eps_fn(model, x, extra_args or {}), levels, on_step)

    return comfy.samplers.KSAMPLER(sample_stem_ddim_inversion)


def ddim_sampler():
    """A KSAMPLER that runs :func:`stem.ddim.ddim_sample` over falling ``sigmas``
    (``DDIMSchedule.sampling_sigmas``) and returns the VP latent at the last level, which is
    what the reference decodes (REFERENCE §3)."""
    import comfy.samplers

    @torch.no_grad()
    def sample_stem_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
        levels = [float(s) for s in sigmas]
        return ddim_sample(x, _eps_fn(model, x, extra_args or {}), levels, _comfy_callback(callback, levels))

    return comfy.samplers.KSAMPLER(sample_stem_ddim)


def preview_callback(model, steps: int):
    """ComfyUI's own step callback: the progress bar and latent previews, one tick a step."""
    import latent_preview

    return latent_preview.prepare_callback(model, steps)


class PassProgress:
    """A progress bar that moves once per UNet pass, its total known from the start.

    TokenFlow's step is several UNet passes (a keyframe pass and one per batch); the bar
    shows each pass, and the sampler's per-step callback adds the latent preview. It is
    shown at 0 before anything runs, so the model loading that precedes the first pass is
    not a silent wait.
    """

    def __init__(self, model, total_passes: int):
        import comfy.utils
        import latent_preview

        self.total = int(total_passes)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.bar.update_absolute(0, self.total)

    def pass_done(self) -> None:
        self.done += 1
        self.bar.update_absolute(self.done, self.total)

    def step_callback(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        """The guider's per-step callback (as ``latent_preview.prepare_callback``'s): the
        step's preview on the bar, which the passes have already moved."""
        preview = None
        if self.previewer is not None:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
        self.bar.update_absolute(self.done, self.total, preview)
