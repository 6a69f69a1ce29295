"""STEM Invert and STEM Reconstruct: DDIM inversion of a clip, and the DDIM way back (the run is
``host/inversion_run.py``)."""
from __future__ import annotations

from .host.inversion_run import invert, reconstruct
from .host.latents import latent_frames
from .host.pack import CATEGORY


class STEMInvert:
    DESCRIPTION = (
        "DDIM inversion of a whole clip (no guidance, as in the reference). With a STEM-patched "
        "model it is STEM inversion; with a plain model it is the usual per-frame DDIM inversion "
        "(a baseline). Outputs the trajectory for TokenFlow Edit / STEM Reconstruct, and the "
        "noisiest latent."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STEM_INVERSION", "LATENT")
    RETURN_NAMES = ("inversion", "inverted_latent")
    OUTPUT_TOOLTIPS = (
        "The latent at every timestep, the schedule, the source prompt and the settings.",
        "The noisiest latent (k-diffusion form, for a KSampler with add_noise disabled).",
    )
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.x/SD2.x/SDXL model; patch it with STEM Attention Patch for STEM inversion."}),
                "latent": ("LATENT", {"tooltip": "The clip's frames encoded with VAE Encode."}),
                "conditioning": ("CONDITIONING", {"tooltip": "The source prompt: what the clip shows."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                  "tooltip": "DDIM inversion steps (the reference uses 50). TokenFlow Edit needs a step count whose timesteps are among these."}),
            }
        }

    def invert(self, model, latent, conditioning, steps):
        inv = invert(model, latent_frames(latent), conditioning, steps)
        return (inv, {"samples": inv.noisiest.clone()})


class STEMReconstruct:
    DESCRIPTION = (
        "Runs plain DDIM back down from an inversion's noisiest latent with its source prompt. Use "
        "the same model as for the inversion (STEM-patched for STEM): how close the result is to "
        "the source clip measures the inversion."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The reconstructed clip's latent; decode it with VAE Decode.",)
    FUNCTION = "reconstruct"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the inversion was made with."}),
                "inversion": ("STEM_INVERSION", {"tooltip": "From STEM Invert or Load STEM Inversion."}),
            },
            "optional": {
                "conditioning": ("CONDITIONING", {"tooltip": "Overrides the source prompt stored with the inversion."}),
                "source_latent": ("LATENT", {"tooltip": "Optional check: refuse if the inversion was not made from this latent."}),
            },
        }

    def reconstruct(self, model, inversion, conditioning=None, source_latent=None):
        if source_latent is not None:
            inversion.check_matches(latent_frames(source_latent, "source_latent"))
        out, notes = reconstruct(model, inversion, conditioning)
        if notes:  # shown on the node as well as in the log
            return {"ui": {"text": notes}, "result": ({"samples": out},)}
        return ({"samples": out},)


NODE_CLASS_MAPPINGS = {"STEMInvert": STEMInvert, "STEMReconstruct": STEMReconstruct}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMInvert": "STEM Invert", "STEMReconstruct": "STEM Reconstruct"}
