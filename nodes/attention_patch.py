"""STEM Attention Patch: every attn1 of the UNet attends to EM bases of the whole clip."""
from __future__ import annotations

import torch

from ..stem.attention import stem_attention
from ..stem.em import DEFAULT_EM_ITERS, DEFAULT_NUM_BASES, DEFAULT_TAU
from .common import CATEGORY, attn1_sites, check_model, layer_seed, refuse_split_frames

GROUPINGS = ["whole clip", "chunks of n frames"]


def make_stem_attn1(settings: dict):
    """The attn1 replacement: ``p(q, k, v, extra_options) -> out`` with ``[B, N, heads*d]``.

    A closure over plain numbers, so ``clone()`` deep-copies nothing large. Each cond/uncond
    chunk of the batch is one group (or consecutive groups of n frames).
    """
    frames_per_group = settings["frames_per_group"] if settings["grouping"] == GROUPINGS[1] else None

    def stem_attn1(q, k, v, extra_options):
        refuse_split_frames(extra_options)
        chunks = len(extra_options.get("cond_or_uncond") or [0])
        gen = torch.Generator().manual_seed(layer_seed(settings["seed"], extra_options))
        return stem_attention(
            q, k, v, extra_options["n_heads"], num_chunks=chunks, frames_per_group=frames_per_group,
            num_bases=settings["num_bases"], iters=settings["em_iters"], tau=settings["tau"], generator=gen,
        )

    return stem_attn1


def apply_stem_patch(model, settings: dict):
    """A clone of ``model`` with STEM attention on every self-attention layer."""
    m = model.clone()
    patch = make_stem_attn1(settings)
    for block, idx, tidx in attn1_sites(m):
        m.set_model_attn1_replace(patch, block, idx, tidx)
    # read by STEM Invert, which records how the inversion was made
    m.model_options["transformer_options"]["stem_attention"] = dict(settings)
    return m


class STEMAttentionPatch:
    DESCRIPTION = (
        "Replaces every self-attention of the UNet with STEM attention (Li et al., CVPR 2024): "
        "for each clip, an EM loop condenses the keys and values of ALL frames into a few bases, "
        "and every frame attends to them. Use it on the model you give STEM Invert (and STEM "
        "Reconstruct), or on a KSampler for temporally consistent video-to-video. The input MODEL "
        "is left untouched."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A copy of the model whose self-attention uses STEM bases.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.x or SD2.x model (LoRA and other patches are kept)."}),
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
            }
        }

    def patch(self, model, num_bases, em_iters, tau, seed, grouping, frames_per_group):
        check_model(model)
        settings = {"attention": "stem", "num_bases": num_bases, "em_iters": em_iters, "tau": tau, "seed": seed,
                    "grouping": grouping, "frames_per_group": frames_per_group}
        return (apply_stem_patch(model, settings),)


NODE_CLASS_MAPPINGS = {"STEMAttentionPatch": STEMAttentionPatch}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMAttentionPatch": "STEM Attention Patch"}
