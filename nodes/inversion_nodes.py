"""STEM Invert and STEM Reconstruct: DDIM inversion of a clip, and the DDIM way back."""
from __future__ import annotations

import logging

import torch

from ..stem.cost import measure
from ..stem.inversion import Inversion
from .host_base import CATEGORY
from .host_latents import inversion_conditioning, latent_frames, single_cond
from .host_memory import returning_memory
from .host_model import check_model, model_family, model_schedule
from .host_plans import plan_run, with_plan
from .host_sampling import ddim_sampler, inversion_sampler, preview_callback

log = logging.getLogger("ComfyUI-STEM")


def _guider(model, conditioning):
    """ComfyUI's own guider at cfg 1: only the conditional branch runs (REFERENCE §3: no CFG),
    and the conditioning goes through ComfyUI's normal processing."""
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(conditioning, conditioning)
    g.set_cfg(1.0)
    return g


def invert(model, samples: torch.Tensor, conditioning, steps: int) -> Inversion:
    """DDIM inversion of ``samples`` (LATENT scale) with ``model`` as it is patched."""
    prediction = check_model(model)
    sched = model_schedule(model, steps)
    plan = plan_run(model, samples, 1, "STEM Invert")  # before the first UNet call
    settings = dict(model.model_options.get("transformer_options", {}).get("stem_attention") or {"attention": "per-frame"})
    model = with_plan(model, plan)
    trajectory = [samples.float().cpu()]
    base = model.model

    def record(i, x):
        trajectory.append(base.process_latent_out(x.float()).cpu())

    g = _guider(model, conditioning)
    with returning_memory(), measure(model.load_device) as cost:
        g.sample(
            torch.zeros_like(samples), samples, inversion_sampler(record),
            torch.tensor(sched.inversion_sigmas, dtype=torch.float32),
            callback=preview_callback(model, steps), disable_pbar=True, seed=0,
        )
    cond, pooled, sizes = single_cond(conditioning, "conditioning")
    if sizes:
        settings["size_conditioning"] = sizes
    settings.update({"frames_per_pass": plan.frames_per_pass, "passes": plan.passes,
                     "memory_estimate_mib": round(plan.estimate_bytes / 2**20, 1)})
    # wall time and peak memory of the whole inversion (model loading included when it happens here)
    settings.update({"steps": steps, "prediction": prediction, "model_family": model_family(model), **cost.as_dict()})
    return Inversion(
        latents=torch.stack(trajectory),
        timesteps=list(reversed(sched.timesteps)),
        sigmas=torch.tensor(sched.inversion_sigmas, dtype=torch.float64),
        cond=cond.float().cpu(),
        pooled=None if pooled is None else pooled.float().cpu(),
        settings=settings,
    )


def reconstruct(model, inv: Inversion, conditioning=None) -> torch.Tensor:
    """DDIM sampling back down the inversion's own schedule from its noisiest latent."""
    check_model(model)
    conditioning = conditioning if conditioning is not None else inversion_conditioning(inv)
    levels = list(reversed(inv.sigmas.tolist()))
    start = inv.noisiest.clone()
    model = with_plan(model, plan_run(model, start, 1, "STEM Reconstruct"))
    g = _guider(model, conditioning)
    with returning_memory():
        return g.sample(
            torch.zeros_like(start), start, ddim_sampler(), torch.tensor(levels, dtype=torch.float32),
            callback=preview_callback(model, inv.steps), disable_pbar=True, seed=0,
        )


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
        samples = latent_frames(latent)
        inv = invert(model, samples, conditioning, steps)
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
        return ({"samples": reconstruct(model, inversion, conditioning)},)


NODE_CLASS_MAPPINGS = {"STEMInvert": STEMInvert, "STEMReconstruct": STEMReconstruct}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMInvert": "STEM Invert", "STEMReconstruct": "STEM Reconstruct"}
