"""The sampler-side half of a TokenFlow edit: a guider that runs each step's passes (REFERENCE §5).

Each step is a keyframe pass, then one propagation pass per batch; each pass is one
three-branch UNet call through ComfyUI's own ``calc_cond_batch`` (target, negative, source),
so FreeU, LoRA and ControlNet keep working. The guider reads the step from the noise level it
is handed (no counter fed from the sampler), and the PnP windows are noise-level thresholds.

This module subclasses ComfyUI's ``CFGGuider`` and so imports ComfyUI: only an edit that runs
imports it (``tokenflow_run``).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import comfy.samplers
import torch

from ...stem.inversion import Inversion
from ...stem.tokenflow import batch_ranges, sample_keyframes
from .cancel import interrupted
from .control_hints import frame_hints, interleaved_hints
from .passes import LayerSync
from .progress import PassProgress
from .tokenflow_hooks import KEYFRAMES, PROPAGATION, SOURCE, KeyframeRecord, PassContext, SourceMissing, with_pass

log = logging.getLogger("ComfyUI-STEM")

SOURCE_COND = "stem_source"  # the guider's name for the source prompt's conds


@dataclass(frozen=True)
class EditPlan:
    """What a run needs that does not change during it."""

    timesteps: list[int]  # editing timesteps, noisiest first
    levels: list[float]  # their sigmas
    batch_size: int
    attention_from: float  # PnP q/k injection at levels >= this
    features_from: float  # PnP feature injection at levels >= this
    use_true_positions: bool
    cfg: float
    keyframes_per_pass: int  # keyframes the keyframe pass computes at a time (0: all)

    def step_at(self, sigma: float) -> int:
        """The step whose level is ``sigma``."""
        return min(range(len(self.levels)), key=lambda i: abs(self.levels[i] - sigma))

    def passes(self, num_frames: int) -> int:
        """UNet passes a step takes: the keyframe pass and one per batch."""
        return 1 + len(batch_ranges(num_frames, self.batch_size))


@dataclass
class Step:
    """What the passes of one editing step share."""

    sigma: float
    num_frames: int
    keyframes: torch.Tensor  # [K] absolute keyframe indices, drawn anew each step
    source: torch.Tensor  # the inversion's latent at this level, in the model's scale [F, C, h, w]
    record: KeyframeRecord  # what the keyframe pass leaves for the propagation passes


class TokenFlowGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose ``predict_noise`` is a TokenFlow step over the whole clip.

    ``split_calls`` (on ``trace``) is set once ComfyUI has run an edit branch before the source
    (it could not batch the conds: memory, a ControlNet on only some conds); from then on every
    pass calls the source branch first, then the edit branches: slower, still exact.
    """

    def __init__(self, model, plan: EditPlan, inv: Inversion, seed: int, progress: PassProgress | None, trace):
        super().__init__(model)
        self.plan = plan
        self.inv = inv
        self.generator = torch.Generator().manual_seed(int(seed))
        self.progress = progress
        self.trace = trace

    def set_branches(self, positive, negative, source) -> None:
        """The target, negative and source prompts' conditioning, and the guidance scale."""
        self.inner_set_conds({"positive": positive, "negative": negative, SOURCE_COND: source})
        self.set_cfg(self.plan.cfg)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep.flatten()[0])
        index = self.plan.step_at(sigma)
        source = self.inner_model.process_latent_in(self.inv.latent_at(self.plan.timesteps[index]).to(x.device, x.dtype))
        F, bs = x.shape[0], self.plan.batch_size
        step = Step(sigma, F, sample_keyframes(F, bs, self.generator), source, KeyframeRecord())
        self.run_keyframes(step, x, timestep, model_options)
        denoised = torch.empty_like(x)
        for b, frames in enumerate(batch_ranges(F, bs)):
            sl = slice(frames.start, frames.stop)
            cond, uncond, _ = self.run_pass(step, lambda: self.context(step, PROPAGATION, sl, b), sl, x[sl],
                                            timestep[sl], model_options)
            denoised[sl] = self.guided(cond, uncond, x[sl], timestep[sl], model_options)
        return denoised

    def context(self, step: Step, kind: str, frames, batch: int, record: KeyframeRecord | None = None,
                sync: LayerSync | None = None) -> PassContext:
        """The context of one pass over ``frames`` of the clip (its hooks read it)."""
        plan = self.plan
        return PassContext(kind, batch, plan.batch_size, step.keyframes, step.source[frames],
                           step.sigma >= plan.attention_from, step.sigma >= plan.features_from,
                           plan.use_true_positions, step.record if record is None else record, sync=sync)

    def guided(self, cond, uncond, x, timestep, model_options):
        """Classifier-free guidance of one batch's branches, as ComfyUI's own CFGGuider does it."""
        if self.plan.cfg == 1.0:
            return cond
        return comfy.samplers.cfg_function(self.inner_model, cond, uncond, self.plan.cfg, x, timestep,
                                           model_options=model_options, cond=self.conds.get("positive"),
                                           uncond=self.conds.get("negative"))

    def calls(self, step: Step, ctx: PassContext, frames, x, ts, model_options, hints: bool = True):
        """The UNet calls of one pass over ``frames`` of the clip (``x`` and ``ts`` are already
        cut to them): all three branches in one call, or, once ComfyUI has run an edit branch
        before the source (:class:`SourceMissing`), the source branch first. ``hints``: give
        the controls the frames' hints (passes that run interleaved get them otherwise)."""
        conds = [self.conds.get("positive"), self.conds.get("negative") if self.plan.cfg != 1.0 else None,
                 self.conds[SOURCE_COND]]
        calc = comfy.samplers.calc_cond_batch
        options = with_pass(model_options, ctx)
        with frame_hints(self.conds, frames, step.num_frames if hints else 0):
            if not self.trace.split_calls:
                return calc(self.inner_model, conds, x, ts, options)
            calc(self.inner_model, [None, None, conds[SOURCE]], x, ts, options)
            return calc(self.inner_model, conds[:2] + [None], x, ts, options)

    def attempts(self, run):
        """``run()``, and once more with the source branch called first if ComfyUI split the
        branches the first time."""
        interrupted()
        try:
            return run()
        except SourceMissing:
            if self.trace.split_calls:
                raise
            log.info("TokenFlow Edit: ComfyUI ran the branches separately; calling the source branch first")
            self.trace.split_calls = True
            return run()

    def run_pass(self, step: Step, make, frames, x, ts, model_options):
        """One pass (``make()`` gives its context, anew for each attempt) over ``frames``."""
        out = self.attempts(lambda: self.calls(step, make(), frames, x, ts, model_options))
        self.pass_done()
        return out

    def run_keyframes(self, step: Step, x, ts, model_options):
        """The keyframe pass, in passes of at most ``keyframes_per_pass`` keyframes that meet at
        every self-attention (their extended attention spans all keyframes); their records
        are joined into the step's record for the propagation passes. Its output is discarded
        (REFERENCE §5.3)."""
        keyframes = step.keyframes.tolist()
        n = self.plan.keyframes_per_pass or len(keyframes)
        if n >= len(keyframes):
            self.run_pass(step, lambda: self.context(step, KEYFRAMES, keyframes, 0), keyframes, x[keyframes],
                          ts[: len(keyframes)], model_options)
            return
        groups = [keyframes[s: s + n] for s in range(0, len(keyframes), n)]
        contexts = []

        def run():
            sync = LayerSync()
            contexts[:] = [self.context(step, KEYFRAMES, g, 0, KeyframeRecord(), sync) for g in groups]
            with interleaved_hints(self.conds, groups, step.num_frames) as entering:
                sync.run([functools.partial(self.calls, step, c, g, x[g], ts[: len(g)], model_options, False)
                          for c, g in zip(contexts, groups)], entering)

        self.attempts(run)
        step.record.take([c.keyframe_record for c in contexts])
        self.pass_done()

    def pass_done(self) -> None:
        if self.progress is not None:
            self.progress.pass_done()
