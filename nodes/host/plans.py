"""How many frames go through the UNet at a time, and how much memory that takes.

STEM Invert and STEM Reconstruct plan their run before the first UNet call: the pass size
(the STEM Attention Patch's ``frames_per_pass``, or with 0 the largest that fits the free
memory), the estimate (``stem.memory``), a refusal naming both when even one frame a pass
would not fit. The plan rides on their clone of the model as its settings with the resolved
pass size (:func:`with_plan`), so every call of the run uses it. A model used elsewhere (a
plain KSampler) plans each call the same way (:func:`plan_for_call`).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ...stem.memory import DEFAULT_SHARE, CallShape, PassPlan, plan_fatezero, plan_passes, plan_tokenflow
from .layer import chunk_count
from .memory import free_memory
from .pack import StemError
from .progress import show_text
from .settings import AttentionSettings
from .unet import memory_profile

log = logging.getLogger("ComfyUI-STEM")

FEWER_FRAMES = "fewer frames (frame_load_cap, select_every_nth) or a smaller size on Load Video Frames"


def compute_dtype(model) -> torch.dtype:
    """The dtype the UNet computes in: its manual-cast dtype where one is set (half weights on a
    device that computes them in fp32, or ``set_model_compute_dtype``), else its weights' dtype."""
    cast = model.get_model_object("manual_cast_dtype")
    return cast if cast is not None else model.model.get_dtype()


def _element_size(model) -> int:
    return torch.tensor([], dtype=compute_dtype(model)).element_size()


def _free_for_run(model) -> int | None:
    """Free memory on the model's device once the model is loaded there."""
    device = model.load_device
    free = free_memory(device)
    if free is None:
        return None
    if torch.device(device).type != "cpu":
        free -= max(0, model.model_size() - model.loaded_size())
    return free


def _pass_count(p: PassPlan) -> str:
    return f"{p.passes} pass{'es' if p.passes > 1 else ''} of up to {p.frames_per_pass}"


def _estimate(p: PassPlan) -> str:
    return f"about {p.estimated_bytes / 2**30:.2f} GiB above the model"


def _fitting_plan(node: str, plan: Callable[[int], tuple[PassPlan, bool]], requested: int, free: int | None,
                  describe: Callable[[PassPlan], str], fewer: str, input_name: str,
                  unsplit: str | None = None) -> PassPlan:
    """``plan(requested)`` where it fits, logged; else a refusal naming the estimate, the free
    memory and the fix: ``unsplit`` where the run cannot be split, ``fewer`` where even the
    smallest pass would not fit, else the largest ``input_name`` that fits."""
    chosen, fits = plan(requested)
    if fits:
        log.info("%s: %s (%s %s)", node, describe(chosen), input_name, requested or "auto")
        show_text(f"{describe(chosen)} ({input_name} {requested or 'auto'})")
        return chosen
    budget = f"{free / 2**30:.2f} GiB is free and a run may take {int(DEFAULT_SHARE * 100)}% of it"
    if unsplit is not None:
        raise StemError(f"{node}: {describe(chosen)} would not fit: {budget}. {unsplit}")
    auto, auto_fits = plan(0)
    if not auto_fits:
        raise StemError(f"{node}: even {describe(auto)} would not fit: {budget}. {fewer}")
    raise StemError(f"{node}: {input_name} {requested} means {describe(chosen)}, which would not fit: {budget}. "
                    f"Set {input_name} to 0 (auto) or at most {auto.frames_per_pass}")


def plan_run(model, latent: torch.Tensor, rows_per_frame: int, node: str) -> PassPlan:
    """The run's pass plan for ``latent`` ``[F, C, h, w]``, logged; refuses what cannot fit."""
    settings = AttentionSettings.of(model)
    call = CallShape(latent.shape[0], latent.shape[-2] * latent.shape[-1], rows_per_frame, _element_size(model),
                     memory_profile(model), settings is not None and settings.gathers_clip)
    free = _free_for_run(model)
    unsplit = None if settings is not None else (f"Put STEM Attention Patch (any attention mode) on the model, whose "
                                                 f"frames_per_pass runs the clip in passes, or use {FEWER_FRAMES}")
    requested = settings.frames_per_pass if settings is not None else call.frames
    return _fitting_plan(node, lambda n: plan_passes(call, free, n), requested, free,
                         lambda p: f"{p.frames} frames in {_pass_count(p)}, {_estimate(p)}", f"Use {FEWER_FRAMES}",
                         "frames_per_pass", unsplit)


def plan_edit(model, latent: torch.Tensor, keyframes: int, batch_size: int, branches: int, requested: int,
              node: str = "TokenFlow Edit") -> PassPlan:
    """A TokenFlow edit's plan: keyframes a pass (``requested``, 0 = the most that fit), its
    estimate (``stem.memory.tokenflow_step_bytes``), logged; refuses what cannot fit."""
    call = CallShape(keyframes, latent.shape[-2] * latent.shape[-1], branches, _element_size(model),
                     memory_profile(model))
    free = _free_for_run(model)
    return _fitting_plan(node, lambda n: plan_tokenflow(call, batch_size, free, n), requested, free,
                         lambda p: f"{keyframes} keyframes in {_pass_count(p)} and propagation passes of {batch_size} "
                                   f"frames, {_estimate(p)}",
                         "Use a smaller batch_size (fewer frames a propagation pass), or "
                         f"{FEWER_FRAMES}", "keyframes_per_pass")


def plan_fatezero_edit(model, latent: torch.Tensor, branches: int, requested: int,
                       node: str = "FateZero Edit") -> PassPlan:
    """A FateZero edit's plan: frames a pass of each branch (``requested``, 0 = the most that fit),
    its estimate (``stem.memory.fatezero_step_bytes``), logged; refuses what cannot fit."""
    call = CallShape(latent.shape[0], latent.shape[-2] * latent.shape[-1], branches, _element_size(model),
                     memory_profile(model))
    free = _free_for_run(model)
    return _fitting_plan(node, lambda n: plan_fatezero(call, free, n), requested, free,
                         lambda p: f"{p.frames} frames of {branches} branches in {_pass_count(p)} each, {_estimate(p)}",
                         f"Use {FEWER_FRAMES}", "frames_per_pass")


def with_plan(model, plan: PassPlan):
    """``model`` whose calls run in the plan's passes: a clone whose settings carry the resolved
    pass size (an unpatched model runs in one pass, and is returned as it is)."""
    settings = AttentionSettings.of(model)
    return model if settings is None else settings.with_pass_size(plan.frames_per_pass).on(model)


def plan_for_call(x: torch.Tensor, transformer_options: dict) -> int:
    """Frames a pass for one UNet call of a patched model: the settings' pass size (a run's plan,
    or the patch's own), else (0, auto) the largest that fits the free memory now."""
    settings = AttentionSettings.from_options(transformer_options)
    if settings.frames_per_pass:
        return settings.frames_per_pass
    chunks = chunk_count(transformer_options)
    call = CallShape(x.shape[0] // chunks, x.shape[-2] * x.shape[-1], chunks, x.element_size(), settings.profile,
                     settings.gathers_clip)
    plan, _ = plan_passes(call, free_memory(x.device))
    return plan.frames_per_pass
