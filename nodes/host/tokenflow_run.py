"""One TokenFlow edit (REFERENCE §5): the settings, the plan, and the driver the node calls.

The steps themselves run in ``tokenflow_guider`` (each step's passes) and ``tokenflow_hooks``
(what a pass does in every layer); the maths is ``stem/tokenflow.py``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ...stem.inversion import Inversion
from ...stem.memory import PassPlan
from ...stem.tokenflow import batch_ranges
from .latents import inversion_conditioning
from .memory import returning_memory
from .pack import StemError
from .plans import plan_edit
from .pnp import PnPLayout, parse_blocks, pnp_layout
from .progress import PassProgress
from .sampling import ddim_sampler, edit_levels
from .settings import AttentionSettings
from .tokenflow_hooks import build_edit_model
from .unet import check_model, model_family

log = logging.getLogger("ComfyUI-STEM")


@dataclass(frozen=True)
class TokenFlowSettings:
    """TokenFlow Edit's inputs (the reference's defaults, REFERENCE §6)."""

    cfg: float = 7.5
    pnp_attn_t: float = 0.5  # share of the steps, from the first, whose q/k are the source's
    pnp_f_t: float = 0.8  # share of the steps whose ResNet features are the source's
    batch_size: int = 8  # frames a batch: one keyframe a batch each step
    seed: int = 1  # the keyframe draws
    steps: int = 0  # 0: the inversion's
    true_keyframe_positions: bool = False  # weigh keyframes by their sampled positions, not batch middles
    keyframes_per_pass: int = 0  # 0: the most that fit
    pnp_attention_blocks: str = "auto"  # output blocks given the source's q/k ("4-11", "1,2,5")
    pnp_feature_block: int = -1  # output block given the source's features (-1: the reference's rule)

    def layout(self, model) -> PnPLayout:
        feature_block = None if self.pnp_feature_block < 0 else self.pnp_feature_block
        return pnp_layout(model, parse_blocks(self.pnp_attention_blocks), feature_block)


@dataclass
class RunTrace:
    """What a run decided, for the log and the node's UI."""

    notes: list = field(default_factory=list)  # said to the user (log and node UI)
    plan: PassPlan | None = None  # keyframes a pass and the memory estimate
    layout: PnPLayout | None = None  # where the source was injected
    split_calls: bool = False  # ComfyUI could not batch the branches: the source ran first in every pass


def window_threshold(levels: list[float], steps_in_window: int) -> float:
    """The noise level from which a PnP window is open: the first ``steps_in_window`` of the
    falling ``levels`` (REFERENCE §5.2: ``int(S * pnp_t)`` steps), as a threshold halfway to
    the next level so that float rounding of a level never moves it."""
    if steps_in_window <= 0:
        return math.inf
    if steps_in_window >= len(levels):
        return 0.0
    return 0.5 * (levels[steps_in_window - 1] + levels[steps_in_window])


def notes_for(model, inv: Inversion) -> list[str]:
    """What to tell the user before an edit: an inversion made with another model family, and a
    STEM Attention Patch the edit does not use (TokenFlow puts its own extended attention on
    every self-attention, as the STEM reference does, REFERENCE §5)."""
    notes = []
    family = inv.settings.get("model_family")
    if family and family != model_family(model):
        notes.append(f"TokenFlow Edit: the inversion was made with a {family} model, this is a "
                     f"{model_family(model)} model; invert the clip with the model you edit with")
    settings = AttentionSettings.of(model)
    if settings is not None and settings.mode != "per-frame":
        notes.append(f"TokenFlow Edit: the model carries a STEM Attention Patch ('{settings.mode}'), which the edit "
                     "does not use: TokenFlow puts its own extended attention on every self-attention, as the STEM "
                     "reference does. Connect the model from before STEM Attention Patch (the inversion keeps its "
                     "STEM attention).")
    return notes


def tokenflow_edit(model, inv: Inversion, positive, negative, settings: TokenFlowSettings = TokenFlowSettings(),
                   source_conditioning=None, progress: bool = True) -> tuple[torch.Tensor, RunTrace]:
    """Edit the inverted clip towards ``positive``; returns the edited latent (LATENT scale) and
    what the run decided. The keyframe pass computes ``settings.keyframes_per_pass`` keyframes
    at a time (0 = the most that fit); their extended attention spans all keyframes either way."""
    from .tokenflow_guider import EditPlan, TokenFlowGuider  # imports ComfyUI's samplers

    check_model(model)
    steps = settings.steps or inv.steps
    if inv.num_frames < settings.batch_size:
        raise StemError(
            f"batch_size: the clip has {inv.num_frames} frames, fewer than batch_size {settings.batch_size}; "
            f"lower batch_size to at most {inv.num_frames} or load more frames"
        )
    trace = RunTrace(notes=notes_for(model, inv))
    for note in trace.notes:
        log.warning(note)
    ts, levels = edit_levels(inv, steps)
    keyframes = len(batch_ranges(inv.num_frames, settings.batch_size))
    branches = 3 if settings.cfg != 1.0 else 2
    trace.plan = plan_edit(model, inv.clean, keyframes, settings.batch_size, branches, settings.keyframes_per_pass)
    plan = EditPlan(ts, levels[:-1], settings.batch_size, window_threshold(levels[:-1], int(steps * settings.pnp_attn_t)),
                    window_threshold(levels[:-1], int(steps * settings.pnp_f_t)), settings.true_keyframe_positions,
                    settings.cfg, trace.plan.frames_per_pass)
    bar = PassProgress(model, steps * plan.passes(inv.num_frames), steps, plan.passes(inv.num_frames)) if progress else None
    trace.layout = settings.layout(model)
    log.info("TokenFlow Edit: %s", trace.layout.describe())
    guider = TokenFlowGuider(build_edit_model(model, trace.layout), plan, inv, settings.seed, bar, trace)
    guider.set_branches(positive, negative, source_conditioning if source_conditioning is not None
                        else inversion_conditioning(inv))
    start = inv.latent_at(ts[0]).clone()  # the inversion's latent at the edit's first level
    with returning_memory():
        out = guider.sample(torch.zeros_like(start), start, ddim_sampler(), torch.tensor(levels, dtype=torch.float32),
                            callback=bar.step_callback if bar is not None else None, disable_pbar=True,
                            seed=settings.seed)
    return out, trace
