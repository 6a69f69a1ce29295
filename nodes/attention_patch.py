"""STEM Attention Patch: every attn1 of the UNet attends to EM bases of the whole clip."""
from __future__ import annotations

import torch

from ..stem.attention import (
    full_attention,
    full_attention_bytes,
    full_attention_passes,
    stem_attention,
    stem_attention_passes,
)
from ..stem.em import DEFAULT_EM_ITERS, DEFAULT_NUM_BASES, DEFAULT_TAU
from .host_base import CATEGORY, StemError
from .host_memory import free_memory
from .host_model import attention_precision, attn1_sites, check_model, layer_seed, refuse_split_frames
from .host_passes import WRAPPER_KEY, attention_meeting, joined, make_pass_wrapper, parted
from .host_plans import plan_for_call

GROUPINGS = ["whole clip", "chunks of n frames"]
MODES = ["stem", "inflated", "per-frame"]
DEFAULT_SETTINGS = {"attention": "stem", "num_bases": DEFAULT_NUM_BASES, "em_iters": DEFAULT_EM_ITERS,
                    "tau": DEFAULT_TAU, "seed": 1, "grouping": GROUPINGS[0], "frames_per_group": 8, "frames_per_pass": 0}
# inflated attention may use at most this share of the free memory of its device
INFLATED_MEMORY_SHARE = 0.5


def _chunks(extra_options: dict) -> int:
    return len(extra_options.get("cond_or_uncond") or [0])


def _attn1(attend, attend_passes=None):
    """An attn1 replacement from ``attend(q, k, v, extra_options)`` over one batch. In a clip
    run in passes, the passes meet here and ``attend_passes(qs, ks, vs, extra_options)`` serves
    them all at once; without it (groups that may straddle passes) the layer is joined into
    one batch for ``attend`` and cut up again."""

    def combine(payloads):
        qs, ks, vs, options = (list(x) for x in zip(*payloads))
        if attend_passes is not None:
            return attend_passes(qs, ks, vs, options[0])
        chunks = _chunks(options[0])
        whole = attend(joined(qs, chunks), joined(ks, chunks), joined(vs, chunks), options[0])
        return parted(whole, qs, chunks)

    def attn1(q, k, v, extra_options):
        refuse_split_frames(extra_options)
        met = attention_meeting(extra_options, q, k, v, combine)  # a pass of a clip in passes
        if met is not None:
            return met
        return attend(q, k, v, extra_options)

    return attn1


def _grouping(settings: dict) -> int | None:
    return settings["frames_per_group"] if settings["grouping"] == GROUPINGS[1] else None


def make_inflated_attn1(settings: dict):
    """Inflated attention: every frame attends to every frame of its group (the STEM paper's
    "radical" baseline), through SDPA's memory-efficient path. Before each layer it estimates
    the memory and refuses a clip that would not fit."""
    frames_per_group = _grouping(settings)

    def check_memory(rows: int, chunks: int, q: torch.Tensor, heads: int) -> None:
        """Refuse a layer whose attention over ``rows`` frames (all passes) would not fit."""
        frames = rows // chunks
        group = min(frames, frames_per_group or frames)
        need = full_attention_bytes(group, q.shape[1], q.shape[2], heads, num_groups=rows // group,
                                    element_size=q.element_size())
        free = free_memory(q.device)
        if free is not None and need > INFLATED_MEMORY_SHARE * free:
            raise StemError(
                f"inflated attention over {group} frames of {q.shape[1]} tokens needs about {need / 2**30:.2f} GiB "
                f"in one layer, over the limit of {INFLATED_MEMORY_SHARE * free / 2**30:.2f} GiB "
                f"({int(INFLATED_MEMORY_SHARE * 100)}% of the {free / 2**30:.2f} GiB free); use attention 'stem', "
                "fewer frames, a smaller size, or 'chunks of n frames'"
            )

    def attend(q, k, v, eo):
        check_memory(q.shape[0], _chunks(eo), q, eo["n_heads"])
        return full_attention(q, k, v, eo["n_heads"], num_chunks=_chunks(eo), frames_per_group=frames_per_group,
                              precision=attention_precision(eo, q.dtype))

    def attend_passes(qs, ks, vs, eo):
        check_memory(sum(q.shape[0] for q in qs), _chunks(eo), qs[0], eo["n_heads"])
        return full_attention_passes(qs, ks, vs, eo["n_heads"], _chunks(eo), attention_precision(eo, qs[0].dtype))

    return _attn1(attend, None if frames_per_group else attend_passes)


def make_stem_attn1(settings: dict):
    """The attn1 replacement: ``p(q, k, v, extra_options) -> out`` with ``[B, N, heads*d]``.

    A closure over plain numbers, so ``clone()`` deep-copies nothing large. Each cond/uncond
    chunk of the batch is one group (or consecutive groups of n frames).
    """
    frames_per_group = _grouping(settings)

    def em(eo, q) -> dict:
        return dict(num_bases=settings["num_bases"], iters=settings["em_iters"], tau=settings["tau"],
                    generator=torch.Generator().manual_seed(layer_seed(settings["seed"], eo)),
                    precision=attention_precision(eo, q.dtype))

    def attend(q, k, v, eo):
        return stem_attention(q, k, v, eo["n_heads"], num_chunks=_chunks(eo), frames_per_group=frames_per_group,
                              **em(eo, q))

    def attend_passes(qs, ks, vs, eo):
        return stem_attention_passes(qs, ks, vs, eo["n_heads"], _chunks(eo), **em(eo, qs[0]))

    return _attn1(attend, None if frames_per_group else attend_passes)


def apply_stem_patch(model, settings: dict):
    """A clone of ``model`` with STEM attention on every self-attention layer."""
    return apply_attention_patch(model, dict(settings, attention="stem"))


def apply_attention_patch(model, settings: dict):
    """A clone of ``model`` with the attention mode ``settings["attention"]`` on every
    self-attention layer: 'stem', 'inflated', or 'per-frame' (SD's own, left as it is)."""
    mode = settings.get("attention", "stem")
    if mode not in MODES:
        raise StemError(f"attention: '{mode}' is not one of {MODES}")
    import comfy.patcher_extension

    settings = {**DEFAULT_SETTINGS, **settings}
    m = model.clone()
    if mode != "per-frame":
        patch = make_stem_attn1(settings) if mode == "stem" else make_inflated_attn1(settings)
        for block, idx, tidx in attn1_sites(m):
            m.set_model_attn1_replace(patch, block, idx, tidx)
    # clips too long for one UNet call run in passes; the passes meet at every self-attention
    # where it spans more than their own frames (stem, inflated)
    synchronised = mode != "per-frame"
    wrapper = make_pass_wrapper(lambda x, options: plan_for_call(settings, x, options), synchronised)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    # read by STEM Invert, which records how the inversion was made, and by the run plans
    m.model_options["transformer_options"]["stem_attention"] = dict(settings)
    return m


class STEMAttentionPatch:
    DESCRIPTION = (
        "Replaces every self-attention of the UNet with STEM attention (Li et al., CVPR 2024): "
        "for each clip, an EM loop condenses the keys and values of ALL frames into a few bases, "
        "and every frame attends to them. Use it on the model you give STEM Invert (and STEM "
        "Reconstruct), or on a KSampler for temporally consistent video-to-video. 'inflated' and "
        "'per-frame' give the paper's two baselines. The input MODEL is left untouched."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A copy of the model with the chosen self-attention.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.x or SD2.x model (LoRA and other patches are kept)."}),
                "attention": (MODES, {"default": "stem",
                                      "tooltip": "stem: every frame attends to EM bases of its clip (the paper). inflated: every frame "
                                                 "attends to every frame (full spatio-temporal attention; memory grows with the "
                                                 "square of the frame count, refused when it would not fit). per-frame: SD's own "
                                                 "attention, for a baseline."}),
                "num_bases": ("INT", {"default": DEFAULT_NUM_BASES, "min": 1, "max": 4096,
                                      "tooltip": "Bases per head (the paper's 256). Fewer is faster and smoother; more keeps more detail."}),
                "em_iters": ("INT", {"default": DEFAULT_EM_ITERS, "min": 1, "max": 50,
                                     "tooltip": "Expectation-maximisation iterations per layer and step (the paper's 5)."}),
                "tau": ("FLOAT", {"default": DEFAULT_TAU, "min": 0.0001, "max": 10.0, "step": 0.0001,
                                  "tooltip": "Temperature of the E-step softmax (0.01 as in the reference)."}),
                "seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seeds the random initial bases; the same seed gives the same result."}),
                "grouping": (GROUPINGS, {"default": GROUPINGS[0],
                                         "tooltip": "whole clip: one set of bases for every frame (the paper). "
                                                    "chunks of n frames: bases per n consecutive frames, as the reference code runs."}),
                "frames_per_group": ("INT", {"default": 8, "min": 1, "max": 4096,
                                             "tooltip": "n for 'chunks of n frames' (the reference's batch_size 8); ignored for 'whole clip'."}),
            },
            "optional": {
                "frames_per_pass": ("INT", {"default": 0, "min": 0, "max": 4096,
                                            "tooltip": "Frames the UNet computes at a time (0 = auto: all of them where they fit "
                                                       "in memory, else the most that fit). Attention still spans the whole clip: "
                                                       "the passes meet at every self-attention, and the result is the same. Fewer "
                                                       "frames a pass need less memory; STEM Invert logs and records its plan."}),
            },
        }

    def patch(self, model, attention, num_bases, em_iters, tau, seed, grouping, frames_per_group, frames_per_pass=0):
        check_model(model)
        settings = {"attention": attention, "num_bases": num_bases, "em_iters": em_iters, "tau": tau, "seed": seed,
                    "grouping": grouping, "frames_per_group": frames_per_group, "frames_per_pass": frames_per_pass}
        return (apply_attention_patch(model, settings),)


NODE_CLASS_MAPPINGS = {"STEMAttentionPatch": STEMAttentionPatch}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMAttentionPatch": "STEM Attention Patch"}
