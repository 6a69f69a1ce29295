"""What the nodes share: model checks, attn1 sites, the DDIM loops as ComfyUI samplers.

ComfyUI is imported inside functions, so this module (and the node classes' INPUT_TYPES)
imports without the host.
"""
from __future__ import annotations

import hashlib
import math
import zlib
from typing import Callable

import torch

from ..stem.ddim import DDIMSchedule, abar_from_sigma

CATEGORY = "STEM video editing"
SUPPORTED_FAMILIES = "SD1.x and SD2.x (eps or v-prediction)"


class StemError(ValueError):
    """A problem with a node's inputs, worded for the user."""


def check_model(model, input_name: str = "model") -> str:
    """The model's prediction type ('eps' or 'v'), read from its (possibly patched) noise
    sampling; refuse other families and parameterisations clearly."""
    import comfy.model_sampling as ms
    import comfy.supported_models as sm

    base = model.model
    cfg = getattr(base, "model_config", None)
    family = type(cfg).__name__ if cfg is not None else type(base).__name__
    ok_family = isinstance(cfg, (sm.SD15, sm.SD20)) and cfg.unet_config.get("in_channels", 4) == 4
    if not ok_family:
        raise StemError(
            f"{input_name}: {family} models are not supported; STEM and TokenFlow here work with "
            f"{SUPPORTED_FAMILIES}. Load an SD1.5 or SD2.1 checkpoint."
        )
    sampling = model.get_model_object("model_sampling")
    kind = type(sampling).__mro__
    discrete = isinstance(sampling, ms.ModelSamplingDiscrete) and ms.EDM not in kind and ms.X0 not in kind
    if discrete and ms.V_PREDICTION in kind:
        return "v"
    if discrete and ms.EPS in kind:
        return "eps"
    raise StemError(f"{input_name}: {type(sampling).__name__} sampling is not supported; use an eps or "
                    "v-prediction SD1.x/SD2.x model (remove ModelSampling nodes that set lcm, x0 or edm)")


def refuse_split_frames(extra_options: dict) -> None:
    """STEM and TokenFlow need every frame of a cond in one call."""
    for key, what in (("context_window", "context windows"), ("ad_params", "AnimateDiff sliding contexts")):
        if key in extra_options:
            raise StemError(
                f"ComfyUI split the frames across passes ({what}); STEM bases and TokenFlow keyframes need "
                "every frame in one pass. Remove the context-window / AnimateDiff context options from the model."
            )


def attn1_sites(model) -> list[tuple[str, int, int]]:
    """Every self-attention of the UNet as ``(block, id, transformer_index)``, the keys of
    ``set_model_attn1_replace``; read from the module tree, not from SD1.5 constants."""
    from comfy.ldm.modules.attention import SpatialTransformer

    unet = model.get_model_object("diffusion_model")
    sites = []
    for block, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for i, seq in enumerate(blocks):
            for layer in seq:
                if isinstance(layer, SpatialTransformer):
                    sites += [(block, i, t) for t in range(len(layer.transformer_blocks))]
    return sites


def model_schedule(model, steps: int) -> DDIMSchedule:
    """The reference DDIM schedule on the model's own noise levels (REFERENCE §2)."""
    ms = model.get_model_object("model_sampling")
    return DDIMSchedule.create(steps, abar_from_sigma(ms.sigmas.double().cpu()))


def model_fingerprint(model) -> str:
    """A cheap identity of the UNet weights: a hash of a few whole tensors."""
    sd = model.model.diffusion_model.state_dict()
    keys = sorted(sd)
    h = hashlib.sha256()
    for k in (keys[0], keys[len(keys) // 2], keys[-1]):
        h.update(k.encode())
        h.update(sd[k].detach().float().cpu().numpy().tobytes()[: 1 << 16])
    return h.hexdigest()[:16]


def layer_seed(seed: int, extra_options: dict) -> int:
    """A seed per (run seed, layer, noise level), so the EM initialisation is reproducible
    whatever order ComfyUI runs the layers and conds in."""
    block = extra_options.get("block", ("?", 0))
    sig = extra_options.get("sigmas")
    level = round(float(sig.flatten()[0]), 5) if sig is not None else 0.0
    key = f"{block[0]}:{block[1]}:{extra_options.get('block_index', 0)}:{level}"
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def _vp_rescale(sigma_from: float, sigma_to: float) -> float:
    return math.sqrt(1.0 + sigma_to**2) / math.sqrt(1.0 + sigma_from**2)


def inversion_sampler(record: Callable[[int, torch.Tensor], None], on_step: Callable[[int], None] | None = None):
    """A ComfyUI sampler that runs DDIM inversion (REFERENCE §3) over increasing ``sigmas``:
    ``[sigma(abar0), sigma(t1), ..., sigma(tS)]``; the latent it gets is the clean one.

    The model must see the latent at the previous level together with the target timestep
    t. ComfyUI divides its input by ``sqrt(1 + sigma_t^2)``, so the input is pre-scaled to
    make the model see exactly ``x / sqrt(1 + sigma_prev^2)``; eps then follows from the
    model's denoised output whatever its parameterisation.
    """
    import comfy.samplers

    @torch.no_grad()
    def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        levels = [float(s) for s in sigmas]
        x = x * math.sqrt(1.0 + levels[0] ** 2)  # the clean latent counts as level abar[0]
        for i in range(len(levels) - 1):
            interrupted()
            if on_step is not None:
                on_step(i)
            sp, st = levels[i], levels[i + 1]
            x_in = x * _vp_rescale(sp, st)
            denoised = model(x_in, st * s_in, **extra_args)
            eps = (x_in - denoised) / st
            x = x + (st - sp) * eps
            record(i, x)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": st, "sigma_hat": st, "denoised": denoised})
        return x

    return comfy.samplers.KSAMPLER(sample_ddim_inversion)


def ddim_sampler(on_step: Callable[[int], None] | None = None):
    """Plain DDIM (eta 0) over decreasing ``sigmas`` ending at ``sigma(abar0)``; returns the
    VP latent at that last level, which is what the reference decodes (REFERENCE §3)."""
    import comfy.samplers

    @torch.no_grad()
    def sample_ddim_reference(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        levels = [float(s) for s in sigmas]
        for i in range(len(levels) - 1):
            interrupted()
            if on_step is not None:
                on_step(i)
            st, sn = levels[i], levels[i + 1]
            denoised = model(x, st * s_in, **extra_args)
            x = x + (sn - st) * (x - denoised) / st
            if callback is not None:
                callback({"x": x, "i": i, "sigma": st, "sigma_hat": st, "denoised": denoised})
        return x / math.sqrt(1.0 + levels[-1] ** 2)

    return comfy.samplers.KSAMPLER(sample_ddim_reference)


def progress_callback(model, steps: int):
    import latent_preview

    return latent_preview.prepare_callback(model, steps)


def single_cond(conditioning, input_name: str):
    """The tensor and pooled output of a one-entry CONDITIONING, for storing with an inversion."""
    if not conditioning:
        raise StemError(f"{input_name}: the conditioning is empty; connect a CLIP Text Encode")
    cond, extras = conditioning[0][0], conditioning[0][1]
    return cond, extras.get("pooled_output")
