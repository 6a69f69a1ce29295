"""How many frames go through the UNet at a time, and how much memory that takes (issue 10).

STEM Invert and STEM Reconstruct plan their run before the first UNet call: the pass size
(the STEM Attention Patch's ``frames_per_pass``, or with 0 the largest that fits the free
memory), the estimate (``stem.memory``), a refusal naming both when even one frame a pass
would not fit. The resolved pass size rides on their clone of the model, so every call of
the run uses it. A model used elsewhere (a plain KSampler) plans each call the same way.
"""
from __future__ import annotations

import logging

import torch

from ..stem.memory import DEFAULT_SHARE, PROFILES, SD1, SDXL, PassPlan, Profile, plan_passes, plan_tokenflow
from .host_base import StemError
from .host_memory import free_memory
from .host_model import is_sdxl

log = logging.getLogger("ComfyUI-STEM")

FRAMES_PER_PASS_KEY = "stem_frames_per_pass"  # transformer_options: the run's resolved pass size


def attention_settings(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("stem_attention") or {"attention": "per-frame"}


def memory_profile(model) -> Profile:
    """The activation model of the UNet's family (``stem.memory``)."""
    return SDXL if is_sdxl(model) else SD1


def _splits(settings: dict) -> bool:
    """Whether the model runs its calls in passes: the STEM Attention Patch installs that."""
    return "frames_per_pass" in settings


def _inflated(settings: dict) -> bool:
    """Whether the passes gather every frame's keys and values (inflated over the whole clip)."""
    return settings.get("attention") == "inflated" and settings.get("grouping") != "chunks of n frames"


def _element_size(model) -> int:
    return torch.tensor([], dtype=model.model.get_dtype()).element_size()


def _available(model) -> int | None:
    """Free memory on the model's device once the model is loaded there."""
    device = model.load_device
    free = free_memory(device)
    if free is None:
        return None
    if torch.device(device).type != "cpu":
        free -= max(0, model.model_size() - model.loaded_size())
    return free


def _passes(p: PassPlan) -> str:
    return f"{p.passes} pass{'es' if p.passes > 1 else ''} of up to {p.frames_per_pass}"


def _above(p: PassPlan) -> str:
    return f"about {p.estimate_bytes / 2**30:.2f} GiB above the model"


def _decide(node: str, plan, requested: int, free: int | None, describe, fewer: str, unsplit: str | None = None) -> PassPlan:
    """``plan(requested)`` where it fits, logged; else a refusal naming the estimate, the free
    memory and the fix: ``unsplit`` where the run cannot be split, ``fewer`` where even the
    smallest pass would not fit, else the largest pass size that fits."""
    chosen, fits = plan(requested)
    if fits:
        log.info("%s: %s (frames_per_pass %s)", node, describe(chosen), requested or "auto")
        return chosen
    budget = f"{free / 2**30:.2f} GiB is free and a run may take {int(DEFAULT_SHARE * 100)}% of it"
    if unsplit is not None:
        raise StemError(f"{node}: {describe(chosen)} would not fit: {budget}. {unsplit}")
    auto, auto_fits = plan(0)
    if not auto_fits:
        raise StemError(f"{node}: even {describe(auto)} would not fit: {budget}. {fewer}")
    raise StemError(f"{node}: frames_per_pass {requested} means {describe(chosen)}, which would not fit: {budget}. "
                    f"Set frames_per_pass to 0 (auto) or at most {auto.frames_per_pass}")


def plan_run(model, latent: torch.Tensor, rows_per_frame: int, node: str) -> PassPlan:
    """The run's pass plan for ``latent`` ``[F, C, h, w]``, logged; refuses what cannot fit."""
    settings = attention_settings(model)
    frames, tokens = latent.shape[0], latent.shape[-2] * latent.shape[-1]
    element, inflated, profile, free = _element_size(model), _inflated(settings), memory_profile(model), _available(model)
    splits = _splits(settings)

    def plan(n: int):
        return plan_passes(frames, tokens, free, n, rows_per_frame, element, inflated, profile=profile)

    fewer = "fewer frames (frame_load_cap, select_every_nth) or a smaller size on Load Video Frames"
    unsplit = None if splits else (f"Put STEM Attention Patch (any attention mode) on the model, whose "
                                   f"frames_per_pass runs the clip in passes, or use {fewer}")
    return _decide(node, plan, int(settings.get("frames_per_pass", 0)) if splits else frames, free,
                   lambda p: f"{p.frames} frames in {_passes(p)}, {_above(p)}", f"Use {fewer}", unsplit)


def plan_edit(model, latent: torch.Tensor, keyframes: int, batch_size: int, branches: int, requested: int,
              node: str = "TokenFlow Edit") -> PassPlan:
    """A TokenFlow edit's plan: keyframes a pass (``requested``, 0 = the most that fit), its
    estimate (``stem.memory.tokenflow_estimate_bytes``), logged; refuses what cannot fit."""
    tokens = latent.shape[-2] * latent.shape[-1]
    element, profile, free = _element_size(model), memory_profile(model), _available(model)

    def plan(n: int):
        return plan_tokenflow(keyframes, batch_size, tokens, free, n, branches, element, profile=profile)

    return _decide(node, plan, requested, free,
                   lambda p: f"{keyframes} keyframes in {_passes(p)} and propagation passes of {batch_size} frames, "
                             f"{_above(p)}",
                   "Use a smaller batch_size (fewer frames a propagation pass), or fewer frames or a smaller size "
                   "on Load Video Frames")


def with_plan(model, plan: PassPlan):
    """A clone of ``model`` whose calls run in the plan's passes."""
    m = model.clone()
    m.model_options["transformer_options"][FRAMES_PER_PASS_KEY] = plan.frames_per_pass
    return m


def plan_for_call(settings: dict, x: torch.Tensor, transformer_options: dict) -> int:
    """Frames a pass for one UNet call: the run's plan where a node made one, else the
    patch's setting, else (0, auto) the largest that fits the free memory now."""
    n = transformer_options.get(FRAMES_PER_PASS_KEY)
    if n:
        return int(n)
    chunks = len(transformer_options.get("cond_or_uncond") or [0])
    frames = x.shape[0] // chunks
    profile = PROFILES.get(settings.get("memory_profile"), SD1)
    plan, _ = plan_passes(frames, x.shape[-2] * x.shape[-1], free_memory(x.device), int(settings.get("frames_per_pass", 0)),
                          chunks, x.element_size(), _inflated(settings), profile=profile)
    return plan.frames_per_pass
