"""STEM Attention Patch: every attn1 of the UNet attends to EM bases of the whole clip."""
from __future__ import annotations

import torch

from ..stem.attention import (
    attend_shared,
    full_attention,
    full_attention_bytes,
    gathered_keys_values,
    stem_attention,
    stem_bases,
)
from ..stem.em import DEFAULT_EM_ITERS, DEFAULT_NUM_BASES, DEFAULT_TAU
from .host_base import CATEGORY, StemError
from .host_memory import free_memory
from .host_model import attention_precision, attn1_sites, check_model, layer_seed, refuse_split_frames
from .host_passes import SHARED_KEY, WRAPPER_KEY, attention_meeting, joined, make_pass_wrapper, parted, projection_meeting
from .host_plans import memory_profile, plan_for_call

GROUPINGS = ["whole clip", "chunks of n frames"]
MODES = ["stem", "inflated", "per-frame"]
DEFAULT_SETTINGS = {"attention": "stem", "num_bases": DEFAULT_NUM_BASES, "em_iters": DEFAULT_EM_ITERS,
                    "tau": DEFAULT_TAU, "seed": 1, "grouping": GROUPINGS[0], "frames_per_group": 8, "frames_per_pass": 0}
# inflated attention may use at most this share of the free memory of its device
INFLATED_MEMORY_SHARE = 0.5


def _chunks(extra_options: dict) -> int:
    return len(extra_options.get("cond_or_uncond") or [0])


def _attn1(attend, shared=None):
    """The attn1 hooks of a mode: ``(replace, patch)``.

    ``attend(q, k, v, extra_options)`` is the mode's attention over one batch. In a clip run in
    passes, ``shared(keys, values, extra_options)`` (whole-clip groups) makes what every pass
    attends to, once per layer: the passes meet in the attn1 ``patch`` before their projections
    (``host_passes.projection_meeting``) and the replacement attends each pass's queries to it.
    Without ``shared`` (groups that may straddle passes; ``patch`` is None) the passes meet in
    the replacement: the layer is joined into one batch for ``attend`` and cut up again.
    """

    def combine(payloads):
        qs, ks, vs, options = (list(x) for x in zip(*payloads))
        chunks = _chunks(options[0])
        whole = attend(joined(qs, chunks), joined(ks, chunks), joined(vs, chunks), options[0])
        return parted(whole, qs, chunks)

    def replace(q, k, v, extra_options):
        refuse_split_frames(extra_options)
        made = extra_options.pop(SHARED_KEY, None)  # a pass that met the others before its projections
        if made is not None:
            return attend_shared(q, *made, extra_options["n_heads"], _chunks(extra_options),
                                 attention_precision(extra_options, q.dtype))
        met = attention_meeting(extra_options, q, k, v, combine)  # a pass of a clip in passes
        if met is not None:
            return met
        return attend(q, k, v, extra_options)

    def patch(n, context, value, extra_options):
        return projection_meeting(n, context, value, extra_options, shared)

    return replace, (patch if shared is not None else None)


def _grouping(settings: dict) -> int | None:
    return settings["frames_per_group"] if settings["grouping"] == GROUPINGS[1] else None


def make_inflated_attn1(settings: dict):
    """Inflated attention: every frame attends to every frame of its group (the STEM paper's
    "radical" baseline), through SDPA's memory-efficient path. Before each layer it estimates
    the memory and refuses a clip that would not fit. Returns ``(replace, patch)`` (see
    :func:`_attn1`)."""
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

    def shared(ks, vs, eo):
        check_memory(sum(k.shape[0] for k in ks), _chunks(eo), ks[0], eo["n_heads"])
        return gathered_keys_values(ks, vs, eo["n_heads"], _chunks(eo), attention_precision(eo, ks[0].dtype))

    return _attn1(attend, None if frames_per_group else shared)


def make_stem_attn1(settings: dict):
    """STEM attention's attn1 hooks ``(replace, patch)`` (see :func:`_attn1`); the replacement
    is ``p(q, k, v, extra_options) -> out`` with ``[B, N, heads*d]``.

    Closures over plain numbers, so ``clone()`` deep-copies nothing large. Each cond/uncond
    chunk of the batch is one group (or consecutive groups of n frames).
    """
    frames_per_group = _grouping(settings)

    def em(eo) -> dict:
        return dict(num_bases=settings["num_bases"], iters=settings["em_iters"], tau=settings["tau"],
                    generator=torch.Generator().manual_seed(layer_seed(settings["seed"], eo)))

    def attend(q, k, v, eo):
        return stem_attention(q, k, v, eo["n_heads"], num_chunks=_chunks(eo), frames_per_group=frames_per_group,
                              precision=attention_precision(eo, q.dtype), **em(eo))

    def shared(ks, vs, eo):
        return stem_bases(ks, vs, eo["n_heads"], _chunks(eo), **em(eo))

    return _attn1(attend, None if frames_per_group else shared)


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

    settings = {**DEFAULT_SETTINGS, **settings, "memory_profile": memory_profile(model).name}
    m = model.clone()
    if mode != "per-frame":
        replace, patch = make_stem_attn1(settings) if mode == "stem" else make_inflated_attn1(settings)
        for block, idx, tidx in attn1_sites(m):
            m.set_model_attn1_replace(replace, block, idx, tidx)
        if patch is not None:  # passes meet before the projections (acts only in a clip run in passes)
            m.set_model_attn1_patch(patch)
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
                "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL model (LoRA and other patches are kept)."}),
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
