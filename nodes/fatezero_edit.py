"""FateZero Edit: attention fusion from an inversion (Qi et al., ICCV 2023; docs/FATEZERO.md).

The run lives in ``host/fatezero_run.py`` (its steps in ``host/fatezero_guider.py``, its layers in
``host/fatezero_hooks.py``), the maths in ``stem/fatezero.py``.
"""
from __future__ import annotations

from ..stem.fatezero import REFINE, REPLACE
from .host.fatezero_run import AS_INVERTED, SPARSE_CAUSAL, FateZeroSettings, fatezero_edit
from .host.latents import latent_frames
from .host.pack import CATEGORY

DEFAULTS = FateZeroSettings()


class FateZeroEdit:
    DESCRIPTION = (
        "FateZero editing (Qi et al., ICCV 2023) from an inversion: during the first steps the target "
        "prompt's cross-attention takes the source's maps (a word swap, or aligned words), and its "
        "self-attention takes the source's map on its own values, optionally only outside a mask of the "
        "edited object's words. The source's maps are recomputed from the inversion's stored latents at "
        "each step (with a STEM inversion: its bases), so memory does not grow with the steps."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The edited clip's latent; decode it with VAE Decode.",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        d = DEFAULTS
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the clip was inverted with, without STEM Attention Patch "
                                               "(the source replays the inversion's own attention). LoRA and FreeU "
                                               "are fine; put a LoRA on the inversion's model too, so that the "
                                               "source replays the inversion exactly."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP: it encodes the prompts and aligns their words."}),
                "inversion": ("STEM_INVERSION", {"tooltip": "From STEM Invert or Load STEM Inversion."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "a man is playing tennis",
                                             "tooltip": "The prompt the clip was inverted with (checked)."}),
                "target_prompt": ("STRING", {"multiline": True, "default": "a man is playing tennis, watercolor painting",
                                             "tooltip": "What the clip should show. Words are matched to the source's "
                                                        "as written, separated by spaces."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "FateZero uses an empty negative prompt."}),
                "controller": ([REFINE, REPLACE], {"default": d.controller,
                                                   "tooltip": "refine: target tokens aligned with the source's take its "
                                                              "cross-attention (added words keep their own): style and "
                                                              "attribute edits. replace: a word swap, prompts of as many "
                                                              "words (cat -> dog)."}),
                "cross_replace_steps": ("FLOAT", {"default": d.cross_replace_steps, "min": 0.0, "max": 1.0, "step": 0.05,
                                                  "tooltip": "Share of the steps, from the first, whose cross-attention "
                                                             "takes the source's (counted over steps + 1, as FateZero)."}),
                "self_replace_steps": ("FLOAT", {"default": d.self_replace_steps, "min": 0.0, "max": 1.0, "step": 0.05,
                                                 "tooltip": "Share of the steps whose self-attention takes the source's "
                                                            "map (layers of at most 32x32 tokens a frame). Higher keeps "
                                                            "more of the source's structure."}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (7.5 in FateZero)."}),
            },
            "optional": {
                "reweight_words": ("STRING", {"default": "", "tooltip": "Target words whose cross-attention is "
                                                                        "scaled by reweight (FateZero's style configs "
                                                                        "put the style words here)."}),
                "reweight": ("FLOAT", {"default": d.reweight, "min": 0.0, "max": 100.0, "step": 0.5,
                                       "tooltip": "The scale of reweight_words (10 in FateZero's style configs)."}),
                "blend_source_words": ("STRING", {"default": "", "tooltip": "The edited object's words in the source "
                                                                            "prompt: the self-attention is fused only "
                                                                            "outside their cross-attention mask "
                                                                            "(shape edits). Empty: fused everywhere."}),
                "blend_target_words": ("STRING", {"default": "", "tooltip": "The object's words in the target prompt "
                                                                            "(for blend_latents)."}),
                "blend_threshold": ("FLOAT", {"default": d.blend_threshold, "min": 0.0, "max": 2.0, "step": 0.05,
                                              "tooltip": "Mask threshold on the normalised word attention (FateZero's "
                                                         "blend_th; 1 or more: no mask, the source everywhere)."}),
                "blend_latents": ("BOOLEAN", {"default": d.blend_latents,
                                              "tooltip": "Also blend the latents outside the mask back to the "
                                                         "inversion's between 20% and 80% of the steps."}),
                "attention": ([AS_INVERTED, SPARSE_CAUSAL], {"default": d.attention,
                                                            "tooltip": "The edit's own self-attention: as the inversion "
                                                                       "(STEM bases with a STEM inversion), or "
                                                                       "FateZero's sparse-causal (each frame to the "
                                                                       "previous and the first)."}),
                "seed": ("INT", {"default": d.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seeds the edit's own STEM bases; the same seed gives the same edit."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                  "tooltip": "Editing steps; 0 uses the inversion's. Others must be a subset of its "
                                             "timesteps."}),
                "frames_per_pass": ("INT", {"default": 0, "min": 0, "max": 4096,
                                            "tooltip": "Frames of each branch the UNet computes at a time (0 = auto: "
                                                       "all where they fit). The branches meet at every attention "
                                                       "layer, so the edit is the same. The estimate is logged, and a "
                                                       "run that cannot fit is refused before it starts."}),
                "source_latent": ("LATENT", {"tooltip": "Optional check: refuse if the inversion was not made "
                                                        "from this latent."}),
            },
        }

    def edit(self, model, clip, inversion, source_prompt, target_prompt, negative_prompt, controller,
             cross_replace_steps, self_replace_steps, cfg, source_latent=None, **options):
        if source_latent is not None:
            inversion.check_matches(latent_frames(source_latent, "source_latent"))
        settings = FateZeroSettings(controller=controller, cross_replace_steps=cross_replace_steps,
                                    self_replace_steps=self_replace_steps, cfg=cfg, **options)
        out, trace = fatezero_edit(model, clip, inversion, (source_prompt, target_prompt, negative_prompt), settings)
        if trace.notes:
            return {"ui": {"text": trace.notes}, "result": ({"samples": out},)}
        return ({"samples": out},)


NODE_CLASS_MAPPINGS = {"STEMFateZeroEdit": FateZeroEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMFateZeroEdit": "FateZero Edit"}
