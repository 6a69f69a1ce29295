"""TokenFlow Edit: keyframes edited jointly with PnP injection, then propagated (REFERENCE §5).

The run lives in ``host/tokenflow_run.py`` (its steps in ``host/tokenflow_guider.py``, the hooks
in ``host/tokenflow_hooks.py``), the maths in ``stem/tokenflow.py``.
"""
from __future__ import annotations

from .host.latents import latent_frames
from .host.pack import CATEGORY
from .host.renamed_inputs import renamed_inputs
from .host.tokenflow_run import TokenFlowSettings, tokenflow_edit

POSITIONS = ["reference (batch middle)", "true keyframe positions"]
# inputs saved under an earlier name: old name -> current name
RENAMED = {"frames_per_pass": "keyframes_per_pass"}


class TokenFlowEdit:
    DESCRIPTION = (
        "TokenFlow editing (Geyer et al., ICLR 2024) from an inversion: each step edits one random "
        "keyframe per batch jointly (extended attention, plug-and-play injection of the source's "
        "attention and features), then propagates the edit to every frame through nearest-neighbour "
        "correspondences of the source. For the reference's look, put FreeU (b1 1.2, b2 1.4, s1 0.9, "
        "s2 0.2) on the model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The edited clip's latent; decode it with VAE Decode.",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.x/SD2.x/SDXL model WITHOUT the STEM patch (editing uses extended attention). FreeU, LoRA and other patches are fine."}),
                "inversion": ("STEM_INVERSION", {"tooltip": "From STEM Invert or Load STEM Inversion."}),
                "positive": ("CONDITIONING", {"tooltip": "The target prompt: what the clip should show."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt (reference: 'ugly, blurry, low res, unrealistic, unaesthetic')."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (7.5 in the reference)."}),
                "pnp_attn_t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                         "tooltip": "Fraction of the steps (from the start) that inject the source's attention queries/keys. Higher keeps more of the source's structure."}),
                "pnp_f_t": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Fraction of the steps that inject the source's ResNet features."}),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 256,
                                       "tooltip": "Frames per batch; one keyframe is drawn per batch each step (8 in the reference)."}),
                "seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seeds the keyframe draws; the same seed gives the same edit."}),
            },
            "optional": {
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                  "tooltip": "Editing steps; 0 uses the inversion's. Others must be a subset of its timesteps."}),
                "source_conditioning": ("CONDITIONING", {"tooltip": "Overrides the source prompt stored with the inversion."}),
                "source_latent": ("LATENT", {"tooltip": "Optional check: refuse if the inversion was not made from this latent."}),
                "keyframe_positions": (POSITIONS, {
                    "default": POSITIONS[0],
                    "tooltip": "How propagation weighs two keyframes: the reference measures distances to each batch's middle; the option uses the sampled keyframes."}),
                "keyframes_per_pass": ("INT", {"default": 0, "min": 0, "max": 4096,
                                            "tooltip": "Keyframes the UNet computes at a time in each step's keyframe pass (0 = auto: all of "
                                                       "them where they fit in memory, else the most that fit). Their extended attention "
                                                       "still spans every keyframe, and the edit is the same. The run's memory estimate "
                                                       "is logged, and a run that cannot fit is refused before it starts."}),
                "pnp_attention_blocks": ("STRING", {"default": "auto", "advanced": True,
                                                    "tooltip": "Output (decoder) blocks whose first self-attention gets the source's "
                                                               "queries and keys: 'auto' is the reference's rule (SD1.x/2.x: 4-11; "
                                                               "SDXL: 1-5, untuned), or ids such as '4-11' or '1,2,5'."}),
                "pnp_feature_block": ("INT", {"default": -1, "min": -1, "max": 64, "advanced": True,
                                              "tooltip": "Output block whose first ResBlock's residual branch gets the source's "
                                                         "features: -1 is the reference's rule (SD1.x/2.x: 4; SDXL: 1, untuned)."}),
            },
            # the prompt, to read inputs that an older workflow saved under an earlier name
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def edit(self, model, inversion, positive, negative, cfg, pnp_attn_t, pnp_f_t, batch_size, seed,
             steps=0, source_conditioning=None, source_latent=None, keyframe_positions=POSITIONS[0],
             keyframes_per_pass=0, pnp_attention_blocks="auto", pnp_feature_block=-1, prompt=None, unique_id=None,
             **older):
        if source_latent is not None:
            inversion.check_matches(latent_frames(source_latent, "source_latent"))
        renamed, notes = renamed_inputs("TokenFlow Edit", RENAMED, prompt, unique_id, older)
        keyframes_per_pass = renamed.get("keyframes_per_pass", keyframes_per_pass)
        settings = TokenFlowSettings(cfg=cfg, pnp_attn_t=pnp_attn_t, pnp_f_t=pnp_f_t, batch_size=batch_size, seed=seed,
                                     steps=steps, true_keyframe_positions=keyframe_positions == POSITIONS[1],
                                     keyframes_per_pass=keyframes_per_pass, pnp_attention_blocks=pnp_attention_blocks,
                                     pnp_feature_block=pnp_feature_block)
        out, trace = tokenflow_edit(model, inversion, positive, negative, settings, source_conditioning)
        notes += trace.notes
        if notes:  # shown on the node as well as in the log
            return {"ui": {"text": notes}, "result": ({"samples": out},)}
        return ({"samples": out},)


NODE_CLASS_MAPPINGS = {"STEMTokenFlowEdit": TokenFlowEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMTokenFlowEdit": "TokenFlow Edit"}
