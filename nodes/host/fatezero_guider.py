"""The sampler-side half of a FateZero edit: a guider whose steps run the branches as passes that meet
at every attention layer (docs/FATEZERO.md §8).

A step's branches: the negative prompt (UNCOND), the target prompt (COND) on the edit's latent, and,
while a window needs it, the SOURCE replaying the inversion's UNet call of this level on the stored
latent. With blend words in the self window a source-only pre-pass first makes the step's blend
mask (its cross-attention comes after the first layers that need it). Each pass goes through
ComfyUI's own ``calc_cond_batch``; LoRA and other weight patches apply to every branch.

This module subclasses ComfyUI's ``CFGGuider`` and so imports ComfyUI: only an edit that runs
imports it (``fatezero_run``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import comfy.samplers
import torch

from ...stem.ddim import from_vp, rescale, to_vp
from ...stem.fatezero import blend_latents
from ...stem.inversion import Inversion
from .cancel import interrupted
from .fatezero_hooks import COND, SOURCE, UNCOND, PassContext, StepState, WordMaps, with_pass
from .passes import LayerSync
from .progress import PassProgress

SOURCE_COND = "stem_source"  # the guider's name for the source prompt's conds
CONDS = {COND: "positive", UNCOND: "negative", SOURCE: SOURCE_COND}


@dataclass(frozen=True)
class FateZeroPlan:
    """What a run needs that does not change during it."""

    timesteps: list[int]  # editing timesteps, noisiest first
    levels: list[float]  # their sigmas, then the final one
    cross_alpha: torch.Tensor  # [S + 1, 77] cross window per step and target token
    self_window: tuple[int, int]  # steps [start, end) that fuse self-attention
    latent_window: range  # steps after which the latents are blended (empty: no latent blend)
    blend_self: bool  # blend words and a threshold below 1: the self-attention blend mask
    threshold: float
    cfg: float
    frames_per_pass: int  # frames each branch's passes compute at a time

    def step_at(self, sigma: float) -> int:
        return min(range(len(self.levels) - 1), key=lambda i: abs(self.levels[i] - sigma))

    def step(self, i: int, target_words: WordMaps | None) -> StepState:
        alpha = self.cross_alpha[i]
        fuse_self = self.self_window[0] <= i < self.self_window[1]
        return StepState(cross_alpha=alpha if bool(alpha.any()) else None, fuse_self=fuse_self,
                         threshold=self.threshold,
                         self_mask=WordMaps() if fuse_self and self.blend_self else None,
                         source_words=WordMaps() if i in self.latent_window else None, target_words=target_words)

    def roles(self, step: StepState, i: int) -> list[str]:
        """The branches step i runs."""
        needs_source = step.cross_alpha is not None or step.fuse_self or i in self.latent_window
        return ([UNCOND] if self.cfg != 1.0 else []) + [COND] + ([SOURCE] if needs_source else [])

    def passes(self, num_frames: int) -> int:
        """UNet passes the whole edit takes (for the progress bar)."""
        groups = -(-num_frames // self.frames_per_pass)
        total = 0
        for i in range(len(self.levels) - 1):
            step = self.step(i, None)
            total += groups * (len(self.roles(step, i)) + (1 if step.self_mask is not None else 0))
        return total


class FateZeroGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose ``predict_noise`` is a FateZero step over the whole clip, and whose
    :meth:`after_step` blends the latents (``blend_latents``)."""

    def __init__(self, model, plan: FateZeroPlan, inv: Inversion, progress: PassProgress | None,
                 blend_latents_on: bool):
        super().__init__(model)
        self.plan = plan
        self.inv = inv
        self.progress = progress
        self.target_words = WordMaps() if blend_latents_on else None
        self.steps: dict[int, StepState] = {}

    def set_branches(self, positive, negative, source) -> None:
        self.inner_set_conds({"positive": positive, "negative": negative, SOURCE_COND: source})
        self.set_cfg(self.plan.cfg)

    def source_latent(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """The model input of the inversion's UNet call at step i's level (FZ §4: the latent one
        level cleaner, seen at this step's timestep), rebuilt from the stored trajectory exactly as
        the inversion built it."""
        inv = self.inv
        k = inv.timesteps.index(self.plan.timesteps[i])
        sig = inv.sigmas.float().tolist()  # the levels as the inversion's sampler had them
        x = self.inner_model.process_latent_in(inv.latents[k].to(like.device, like.dtype))
        if k == 0:  # the clean latent enters at level abar[0]
            x = from_vp(x, sig[0])
        return rescale(x, sig[k], sig[k + 1])

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        interrupted()
        i = self.plan.step_at(float(timestep.flatten()[0]))
        step = self.plan.step(i, self.target_words)
        inputs = {UNCOND: x, COND: x}
        if SOURCE in self.plan.roles(step, i):
            inputs[SOURCE] = self.source_latent(i, x)
        if step.self_mask is not None:  # the step's blend mask, before the layers that need it
            pre = StepState(cross_alpha=None, fuse_self=False, threshold=step.threshold, source_words=step.self_mask)
            self.run_passes(pre, {SOURCE: inputs[SOURCE]}, timestep, model_options)
        outs = self.run_passes(step, {r: inputs[r] for r in self.plan.roles(step, i)}, timestep, model_options)
        if i in self.plan.latent_window:
            self.steps[i] = step  # its source word maps, for after_step
        if self.plan.cfg == 1.0:
            return outs[COND]
        return comfy.samplers.cfg_function(self.inner_model, outs[COND], outs[UNCOND], self.plan.cfg, x, timestep,
                                           model_options=model_options, cond=self.conds.get("positive"),
                                           uncond=self.conds.get("negative"))

    def run_passes(self, step: StepState, inputs: dict, timestep, model_options) -> dict:
        """Every branch of ``inputs`` (role -> its latent) in passes of the plan's frames that meet
        at every attention layer; the denoised output of each branch."""
        frames = next(iter(inputs.values())).shape[0]
        n = self.plan.frames_per_pass
        groups = [slice(s, min(s + n, frames)) for s in range(0, frames, n)]
        sync = LayerSync()
        calls, order = [], []
        for role, x in inputs.items():
            for rows in groups:
                ctx = PassContext(role, sync, step)
                calls.append(functools.partial(self.call, role, ctx, x[rows], timestep[rows], model_options))
                order.append((role, rows))
        outs = sync.run(calls)
        joined = {role: torch.empty_like(x) for role, x in inputs.items()}
        for (role, rows), out in zip(order, outs):
            joined[role][rows] = out
        if self.progress is not None:
            for _ in calls:
                self.progress.pass_done()
        return joined

    def call(self, role: str, ctx: PassContext, x, ts, model_options):
        """One UNet pass of one branch."""
        return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[CONDS[role]]], x, ts,
                                              with_pass(model_options, ctx))[0]

    def after_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """FZ §5 ``blend_latents``: after step i, the edit's latent is taken back to the inversion's
        outside the blend words' mask (the source's words at this step, or the target's own over
        the steps so far). Quirk reproduced: the inversion's latent is the one at step i's level,
        the edit's already at the next (both in their VP form)."""
        step = self.steps.pop(i, None)  # nothing of a step is kept past it
        if i not in self.plan.latent_window or step is None:
            return x
        size = tuple(x.shape[-2:])
        masks = [m for m in (step.source_words.mask(size, step.threshold),
                             self.target_words.mask(size, step.threshold)) if m is not None]
        if not masks:
            return x
        mask = (sum(masks) > 0).to(x.dtype).view(x.shape[0], 1, *size)
        sigma, sigma_next = self.plan.levels[i], self.plan.levels[i + 1]
        x_inv = self.inner_model.process_latent_in(self.inv.latent_at(self.plan.timesteps[i]).to(x.device, x.dtype))
        blended = blend_latents(to_vp(x_inv, sigma), to_vp(x, sigma_next), mask)
        return from_vp(blended, sigma_next)
