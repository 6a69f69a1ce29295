"""STEM Attention Patch: every attn1 of the UNet attends to EM bases of the whole clip (the hooks
are ``host/attention_hooks.py``, the maths ``stem/attention.py``)."""
from __future__ import annotations

from ..stem.em import DEFAULT_EM_ITERS, DEFAULT_NUM_BASES, DEFAULT_TAU, EMParams
from .host.attention_hooks import patched_model
from .host.pack import CATEGORY
from .host.settings import GROUPINGS, MODES, WHOLE_CLIP, AttentionSettings
from .host.unet import check_model


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
                "attention": (list(MODES), {"default": "stem",
                                      "tooltip": "stem: every frame attends to EM bases of its clip (the paper). inflated: every frame "
                                                 "attends to every frame (full spatio-temporal attention; memory grows with the "
                                                 "square of the frame count, refused when it would not fit). per-frame: SD's own "
                                                 "attention, for a baseline. sparse-causal: FateZero's (each frame attends "
                                                 "to the previous and the first frame), to invert a clip for FateZero Edit "
                                                 "as FateZero does."}),
                "num_bases": ("INT", {"default": DEFAULT_NUM_BASES, "min": 1, "max": 4096,
                                      "tooltip": "Bases per head (the paper's 256). Fewer is faster and smoother; more keeps more detail."}),
                "em_iters": ("INT", {"default": DEFAULT_EM_ITERS, "min": 1, "max": 50,
                                     "tooltip": "Expectation-maximisation iterations per layer and step (the paper's 5)."}),
                "tau": ("FLOAT", {"default": DEFAULT_TAU, "min": 0.0001, "max": 10.0, "step": 0.0001,
                                  "tooltip": "Temperature of the E-step softmax (0.01 as in the reference)."}),
                "seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seeds the random initial bases; the same seed gives the same result."}),
                "grouping": (list(GROUPINGS), {"default": WHOLE_CLIP,
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
        settings = AttentionSettings(mode=attention, em=EMParams(num_bases, em_iters, tau), seed=seed, grouping=grouping,
                                     frames_per_group=frames_per_group, frames_per_pass=frames_per_pass)
        return (patched_model(model, settings),)


NODE_CLASS_MAPPINGS = {"STEMAttentionPatch": STEMAttentionPatch}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMAttentionPatch": "STEM Attention Patch"}
