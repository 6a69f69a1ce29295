"""One TokenFlow edit (REFERENCE §5): the plan, the guider that runs each step's passes, and the
driver the node calls.

Design note: like the reference, each pass (keyframes, then each propagation batch) is one
three-branch UNet call. The branches go through ComfyUI's own ``calc_cond_batch`` as three
conds (target, negative, source), so FreeU, LoRA and ControlNet keep working; the source
branch has its own latent (the inversion's), which the APPLY_MODEL wrapper swaps into the
source rows. Where ComfyUI cannot batch the conds together (memory, a ControlNet on only
some conds) and runs an edit branch before the source, the pass is redone as two calls,
source first, for the rest of the run: slower, still exact.

The guider reads the step from the noise level it is handed (no counter fed from the
sampler), and the PnP windows are noise-level thresholds.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..stem.ddim import ddim_timesteps
from ..stem.inversion import Inversion
from ..stem.memory import PassPlan
from ..stem.tokenflow import batch_ranges, sample_keyframes
from .host_base import StemError
from .host_control_hints import frame_hints, interleaved_hints
from .host_latents import inversion_conditioning
from .host_memory import returning_memory
from .host_model import PnPLayout, check_model, interrupted, model_family, pnp_layout
from .host_passes import LayerSync
from .host_plans import plan_edit
from .host_sampling import PassProgress, ddim_sampler
from .host_tokenflow_hooks import (
    KEYFRAMES,
    PROPAGATION,
    SOURCE,
    KeyframeRecord,
    PassContext,
    SourceMissing,
    build_edit_model,
    with_pass,
)

log = logging.getLogger("ComfyUI-STEM")

SOURCE_COND = "stem_source"  # the guider's name for the source prompt's conds


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


def window_threshold(levels: list[float], steps_in_window: int) -> float:
    """The noise level from which a PnP window is open: the first ``steps_in_window`` of the
    falling ``levels`` (REFERENCE §5.2: ``int(S * pnp_t)`` steps), as a threshold halfway to
    the next level so that float rounding of a level never moves it."""
    if steps_in_window <= 0:
        return math.inf
    if steps_in_window >= len(levels):
        return 0.0
    return 0.5 * (levels[steps_in_window - 1] + levels[steps_in_window])


@dataclass(frozen=True)
class EditPlan:
    """What a run needs that does not change during it."""

    timesteps: list[int]  # editing timesteps, noisiest first
    levels: list[float]  # their sigmas
    batch_size: int
    attention_from: float  # PnP q/k injection at levels >= this
    features_from: float  # PnP feature injection at levels >= this
    use_true_positions: bool

    def step_at(self, sigma: float) -> int:
        """The step whose level is ``sigma``."""
        return min(range(len(self.levels)), key=lambda i: abs(self.levels[i] - sigma))

    def passes(self, num_frames: int) -> int:
        """UNet passes a step takes: the keyframe pass and one per batch."""
        return 1 + len(batch_ranges(num_frames, self.batch_size))


@dataclass
class PassTrace:
    step: int
    kind: str
    batch: int
    calls: Counter
    split: bool


@dataclass
class RunTrace:
    """What the passes of a run did, for tests and debugging: hook calls per pass."""

    passes: list = field(default_factory=list)
    split_calls: bool = False
    notes: list = field(default_factory=list)  # said to the user (log and node UI)
    plan: PassPlan | None = None  # keyframes a pass and the memory estimate
    layout: PnPLayout | None = None  # where the source was injected

    def calls(self, hook: str) -> dict:
        """``{(step, kind): {block: count}}`` of one hook, summed over a step's passes of a kind."""
        out: dict = {}
        for p in self.passes:
            for (h, key), n in p.calls.items():
                if h == hook:
                    per = out.setdefault((p.step, p.kind), {})
                    per[key] = per.get(key, 0) + n
        return out


def tokenflow_guider(model, plan: EditPlan, inv: Inversion, source_cond, positive, negative, cfg: float, seed: int,
                     progress: PassProgress | None, trace: RunTrace, keyframes_per_pass: int = 0):
    import comfy.samplers

    generator = torch.Generator().manual_seed(int(seed))

    class TokenFlowGuider(comfy.samplers.CFGGuider):
        def calls(self, ctx: PassContext, frames, x, ts, model_options, num_frames: int, hints: bool = True):
            """The UNet calls of one pass over ``frames`` of the clip (``x`` and ``ts`` are already
            cut to them): all three branches in one call, or, once ComfyUI has run an edit branch
            before the source (:class:`SourceMissing`), the source branch first. ``hints``: give
            the controls the frames' hints (passes that run interleaved get them otherwise)."""
            conds = [self.conds.get("positive"), self.conds.get("negative") if cfg != 1.0 else None,
                     self.conds[SOURCE_COND]]
            calc = comfy.samplers.calc_cond_batch
            options = with_pass(model_options, ctx)
            with frame_hints(self.conds, frames, num_frames if hints else 0):
                if not trace.split_calls:
                    return calc(self.inner_model, conds, x, ts, options)
                calc(self.inner_model, [None, None, conds[SOURCE]], x, ts, options)
                ctx.calls["split_pass", ctx.kind] += 1
                return calc(self.inner_model, conds[:2] + [None], x, ts, options)

        def attempts(self, run):
            """``run()``, and once more with the source branch called first if ComfyUI split the
            branches the first time."""
            interrupted()
            try:
                return run()
            except SourceMissing:
                if trace.split_calls:
                    raise
                log.info("TokenFlow Edit: ComfyUI ran the branches separately; calling the source branch first")
                trace.split_calls = True
                return run()

        def run_pass(self, make, frames, x, ts, model_options, num_frames: int, step: int):
            """One pass (``make()`` gives its context) over ``frames`` of the clip."""
            ctxs = []

            def run():
                ctxs[:] = [make()]
                return self.calls(ctxs[0], frames, x, ts, model_options, num_frames)

            out = self.attempts(run)
            trace.passes.append(PassTrace(step, ctxs[0].kind, ctxs[0].batch, ctxs[0].calls, trace.split_calls))
            if progress is not None:
                progress.pass_done()
            return out

        def run_keyframes(self, make, keyframes: list[int], x, ts, model_options, num_frames: int, step: int,
                          record: KeyframeRecord):
            """The keyframe pass, in passes of at most ``keyframes_per_pass`` keyframes that meet at
            every self-attention (their extended attention spans all keyframes); their records
            are joined into ``record`` for the propagation passes. Its output is discarded
            (REFERENCE §5.3)."""
            n = keyframes_per_pass or len(keyframes)
            if n >= len(keyframes):
                self.run_pass(lambda: make(keyframes, record), keyframes, x[keyframes], ts[: len(keyframes)], model_options,
                              num_frames, step)
                return
            groups = [keyframes[s: s + n] for s in range(0, len(keyframes), n)]
            ctxs = []

            def run():
                sync = LayerSync()
                ctxs[:] = [make(g, KeyframeRecord(), sync) for g in groups]
                with interleaved_hints(self.conds, groups, num_frames) as entering:
                    sync.run([functools.partial(self.calls, c, g, x[g], ts[: len(g)], model_options, num_frames, False)
                              for c, g in zip(ctxs, groups)], entering)

            self.attempts(run)
            record.take([c.keyframe_record for c in ctxs])
            trace.passes += [PassTrace(step, KEYFRAMES, 0, c.calls, trace.split_calls) for c in ctxs]
            if progress is not None:
                progress.pass_done()

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            sigma = float(timestep.flatten()[0])
            step = plan.step_at(sigma)
            F, bs = x.shape[0], plan.batch_size
            src = self.inner_model.process_latent_in(inv.latent_at(plan.timesteps[step]).to(x.device, x.dtype))
            keyframes = sample_keyframes(F, bs, generator)
            record = KeyframeRecord()

            def context(kind, frames, batch, rec=record, sync=None):
                return PassContext(kind, batch, bs, keyframes, src[frames], sigma >= plan.attention_from,
                                   sigma >= plan.features_from, plan.use_true_positions, rec, sync=sync)

            kf = keyframes.tolist()
            self.run_keyframes(lambda frames, rec, sync=None: context(KEYFRAMES, frames, 0, rec, sync),
                               kf, x, timestep, model_options, F, step, record)
            denoised = torch.empty_like(x)
            for b, frames in enumerate(batch_ranges(F, bs)):
                sl = slice(frames.start, frames.stop)
                cond, uncond, _ = self.run_pass(lambda: context(PROPAGATION, sl, b), sl, x[sl], timestep[sl],
                                                model_options, F, step)
                if cfg == 1.0:
                    denoised[sl] = cond
                else:
                    denoised[sl] = comfy.samplers.cfg_function(
                        self.inner_model, cond, uncond, cfg, x[sl], timestep[sl], model_options=model_options,
                        cond=self.conds.get("positive"), uncond=self.conds.get("negative"))
            return denoised

    g = TokenFlowGuider(model)
    g.inner_set_conds({"positive": positive, "negative": negative, SOURCE_COND: source_cond})
    g.set_cfg(cfg)
    return g


def parse_blocks(text: str) -> list[int] | None:
    """``pnp_attention_blocks``: None for "auto", else output block ids ("4-11", "1,2,5")."""
    text = (text or "").strip().lower()
    if text in ("", "auto"):
        return None
    ids = []
    try:
        for part in text.replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            ids += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise StemError(f"pnp_attention_blocks: '{text}' is not 'auto' or output block ids such as '4-11' or "
                        "'1,2,5'") from None
    return ids


def _unused_attention_patch(model) -> str | None:
    """What to tell a user whose MODEL carries a STEM Attention Patch: TokenFlow replaces every
    self-attention with its own (REFERENCE §5: the STEM reference edits with plain extended
    attention), so that patch does nothing here."""
    settings = model.model_options.get("transformer_options", {}).get("stem_attention") or {}
    mode = settings.get("attention", "per-frame")
    if mode == "per-frame":
        return None
    return (f"TokenFlow Edit: the model carries a STEM Attention Patch ('{mode}'), which the edit does not use: "
            "TokenFlow puts its own extended attention on every self-attention, as the STEM reference does. "
            "Connect the model from before STEM Attention Patch (the inversion keeps its STEM attention).")


def tokenflow_edit(model, inv: Inversion, positive, negative, cfg=7.5, pnp_attn_t=0.5, pnp_f_t=0.8,
                   batch_size=8, seed=1, steps=None, source_conditioning=None, use_true_keyframe_positions=False,
                   progress: bool = True, frames_per_pass: int = 0, pnp_attention_blocks: str = "auto",
                   pnp_feature_block: int = -1) -> tuple[torch.Tensor, RunTrace]:
    """Edit the inverted clip towards ``positive``; returns the edited latent (LATENT scale) and
    the run's trace. ``frames_per_pass``: keyframes a keyframe pass computes at a time (0 = the
    most that fit); their extended attention spans all keyframes either way.
    ``pnp_attention_blocks`` ("auto" or output block ids such as "4-11" or "1,2,5") and
    ``pnp_feature_block`` (-1 = auto) move the PnP injection (``host_model.pnp_layout``)."""
    check_model(model)
    steps = steps or inv.steps
    if inv.num_frames < batch_size:
        raise StemError(
            f"batch_size: the clip has {inv.num_frames} frames, fewer than batch_size {batch_size}; "
            f"lower batch_size to at most {inv.num_frames} or load more frames"
        )
    trace = RunTrace()
    family = inv.settings.get("model_family")
    if family and family != model_family(model):
        trace.notes.append(f"TokenFlow Edit: the inversion was made with a {family} model, this is a "
                           f"{model_family(model)} model; invert the clip with the model you edit with")
    unused = _unused_attention_patch(model)
    if unused:
        trace.notes.append(unused)
    for note in trace.notes:
        log.warning(note)
    ts, levels = edit_levels(inv, steps)
    plan = EditPlan(ts, levels[:-1], batch_size, window_threshold(levels[:-1], int(steps * pnp_attn_t)),
                    window_threshold(levels[:-1], int(steps * pnp_f_t)), use_true_keyframe_positions)
    keyframes = len(batch_ranges(inv.num_frames, batch_size))
    trace.plan = plan_edit(model, inv.clean, keyframes, batch_size, 3 if cfg != 1.0 else 2, int(frames_per_pass))
    bar = PassProgress(model, steps * plan.passes(inv.num_frames)) if progress else None
    layout = pnp_layout(model, parse_blocks(pnp_attention_blocks), None if pnp_feature_block < 0 else pnp_feature_block)
    trace.layout = layout
    log.info("TokenFlow Edit: %s", layout.describe())
    m = build_edit_model(model, layout)
    source_cond = source_conditioning if source_conditioning is not None else inversion_conditioning(inv)
    g = tokenflow_guider(m, plan, inv, source_cond, positive, negative, cfg, seed, bar, trace,
                         trace.plan.frames_per_pass)
    start = inv.latent_at(ts[0]).clone()  # the inversion's latent at the edit's first level
    with returning_memory():
        out = g.sample(torch.zeros_like(start), start, ddim_sampler(), torch.tensor(levels, dtype=torch.float32),
                       callback=bar.step_callback if bar is not None else None, disable_pbar=True, seed=seed)
    return out, trace
