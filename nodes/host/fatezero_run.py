"""One FateZero edit (docs/FATEZERO.md): the settings, the plan, and the driver the node calls.

The steps run in ``fatezero_guider`` (each step's passes) and ``fatezero_hooks`` (what a pass
does at every attention layer); the maths is ``stem/fatezero.py``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from ...stem.fatezero import MAX_TOKENS, REFINE, CrossControl, cross_replace_alpha, equalizer, latent_blend_window, window
from ...stem.inversion import Inversion
from .attention_hooks import attention_function
from .fatezero_hooks import FateZeroLayers, build_edit_model
from .latents import inversion_conditioning
from .memory import returning_memory
from .pack import StemError
from .plans import plan_fatezero_edit
from .progress import PassProgress
from .prompt_tokens import encode, split_words, word_columns
from .sampling import ddim_sampler, edit_levels
from .settings import AttentionSettings, describe
from .unet import check_model, model_family

log = logging.getLogger("ComfyUI-STEM")

AS_INVERTED, SPARSE_CAUSAL = "as the inversion", "sparse-causal"


@dataclass(frozen=True)
class FateZeroSettings:
    """FateZero Edit's inputs. The defaults are FateZero's zero-shot style configs: the refine
    controller, cross-attention replaced in the first 0.8 of the steps and self-attention in the
    first 0.7 (their medians), no blending, guidance 7.5, an empty negative prompt."""

    controller: str = REFINE  # 'refine' (aligned words) or 'replace' (a word swap)
    cross_replace_steps: float = 0.8
    self_replace_steps: float = 0.7
    reweight_words: str = ""  # target words whose cross-attention is scaled by reweight
    reweight: float = 10.0
    blend_source_words: str = ""  # the edited object's words in the source prompt: the blend mask
    blend_target_words: str = ""  # ... in the target prompt (the latent blend's mask)
    blend_threshold: float = 0.3
    blend_self_attention: bool = True  # blend the fused self-attention with the edit's own by the mask
    blend_latents: bool = False
    cfg: float = 7.5
    steps: int = 0  # 0: the inversion's
    seed: int = 1  # the edit's own STEM attention (its EM seeds)
    attention: str = AS_INVERTED  # the edit branches' own attention: as the inversion, or sparse-causal
    frames_per_pass: int = 0  # frames of each branch a UNet pass computes (0: the most that fit)


@dataclass
class FateZeroTrace:
    """What a run decided, for the log and the node's UI."""

    notes: list = field(default_factory=list)
    plan: object = None  # the memory plan (stem.memory.PassPlan)
    source_attention: str = ""
    own_attention: str = ""


def _columns(prompt, words_text: str, input_name: str, prompt_name: str) -> torch.Tensor:
    cols = torch.zeros(MAX_TOKENS)
    cols[word_columns(prompt, split_words(words_text), input_name, prompt_name)] = 1.0
    return cols


def _own_attention(settings: FateZeroSettings, inverted: AttentionSettings | None) -> AttentionSettings | None:
    if settings.attention == SPARSE_CAUSAL:
        return AttentionSettings(mode="sparse-causal")
    if settings.attention != AS_INVERTED:
        raise StemError(f"attention: '{settings.attention}' is not '{AS_INVERTED}' or '{SPARSE_CAUSAL}'")
    return None if inverted is None else replace(inverted, seed=int(settings.seed))


def _control(source, target, settings: FateZeroSettings) -> CrossControl:
    reweight = None
    words = split_words(settings.reweight_words)
    if words:
        word_columns(target, words, "reweight_words", "target prompt")
        reweight = equalizer(target, words, [settings.reweight] * len(words))
    try:
        return CrossControl.between(source, target, settings.controller, reweight)
    except ValueError as e:
        raise StemError(f"controller: {e}; use 'refine', which aligns the prompts' tokens, or prompts that differ "
                        "only in swapped words") from None


def _check_source_prompt(inv: Inversion, source_cond) -> None:
    got = source_cond[0][0].float().cpu()
    if inv.cond is None or got.shape != inv.cond.shape or not torch.allclose(got, inv.cond, atol=1e-4):
        raise StemError("source_prompt: this is not the prompt the clip was inverted with (with this CLIP); FateZero "
                        "aligns the target with the inversion's own prompt: give the same text as the source "
                        "prompt of STEM Invert")


def fatezero_edit(model, clip, inv: Inversion, prompts: tuple[str, str, str],
                  settings: FateZeroSettings = FateZeroSettings(), progress: bool = True):
    """Edit the inverted clip from ``prompts`` = (source, target, negative) texts; returns the edited
    latent (LATENT scale) and what the run decided."""
    from .fatezero_guider import FateZeroGuider, FateZeroPlan  # imports ComfyUI's samplers

    check_model(model)
    trace = FateZeroTrace()
    family = inv.settings.get("model_family")
    if family and family != model_family(model):
        raise StemError(f"inversion: it was made with a {family} model and this is a {model_family(model)} model; "
                        "FateZero replays the inversion's UNet calls: invert the clip with the model you edit with")
    source, source_cond = encode(clip, prompts[0], "source_prompt")
    target, target_cond = encode(clip, prompts[1], "target_prompt")
    negative_cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompts[2]))
    _check_source_prompt(inv, source_cond)
    control = _control(source, target, settings)
    blend_source = _columns(source, settings.blend_source_words, "blend_source_words", "source prompt")
    blend_target = _columns(target, settings.blend_target_words, "blend_target_words", "target prompt")
    blending = bool(blend_source.any())
    if settings.blend_latents and not blending:
        raise StemError("blend_latents: name the edited object's words in blend_source_words (and "
                        "blend_target_words) for the latent blend's mask")

    steps = settings.steps or inv.steps
    ts, levels = edit_levels(inv, steps)
    inverted = AttentionSettings.from_record(inv.settings)
    own = _own_attention(settings, inverted)
    trace.source_attention, trace.own_attention = describe(inverted), describe(own)
    branches = 3 if settings.cfg != 1.0 else 2
    trace.plan = plan_fatezero_edit(model, inv.clean, branches, settings.frames_per_pass)
    plan = FateZeroPlan(ts, levels, cross_replace_alpha(steps, settings.cross_replace_steps),
                        window(steps, settings.self_replace_steps),
                        latent_blend_window(steps) if settings.blend_latents else range(0),
                        blending and settings.blend_self_attention and settings.blend_threshold < 1.0,
                        settings.blend_threshold, settings.cfg, trace.plan.frames_per_pass)
    log.info("FateZero Edit: the source replays %s; the edit attends with %s; %s controller",
             trace.source_attention, trace.own_attention, settings.controller)
    layers = FateZeroLayers(attention_function(inverted), attention_function(own), control, blend_source, blend_target)
    bar = PassProgress(model, plan.passes(inv.num_frames), len(levels) - 1) if progress else None
    guider = FateZeroGuider(build_edit_model(model, layers), plan, inv, bar, settings.blend_latents)
    guider.set_branches(target_cond, negative_cond, inversion_conditioning(inv))
    start = inv.latent_at(ts[0]).clone()  # the inversion's noisiest latent on the edit's schedule
    with returning_memory():
        out = guider.sample(torch.zeros_like(start), start, ddim_sampler(guider.after_step),
                            torch.tensor(levels, dtype=torch.float32),
                            callback=bar.step_callback if bar is not None else None, disable_pbar=True, seed=0)
    return out, trace
