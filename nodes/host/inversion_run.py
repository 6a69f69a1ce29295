"""DDIM inversion of a clip (REFERENCE §3), and the DDIM way back, through ComfyUI's own guider."""
from __future__ import annotations

import logging

import torch

from ...stem.cost import measure
from ...stem.inversion import Inversion
from .cancel import with_cancel_checks
from .latents import inversion_conditioning, single_cond
from .memory import returning_memory
from .plans import plan_run, with_plan
from .sampling import ddim_sampler, inversion_sampler, model_schedule, preview_callback
from .settings import AttentionSettings, describe, same_attention
from .unet import check_model, model_family

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
    """DDIM inversion of ``samples`` (LATENT scale) with ``model`` as it is patched. The
    inversion's settings record the attention it ran with (its pass size resolved), the plan,
    the model and what the run cost."""
    prediction = check_model(model)
    sched = model_schedule(model, steps)
    plan = plan_run(model, samples, 1, "STEM Invert")  # before the first UNet call
    model = with_cancel_checks(with_plan(model, plan))
    settings = AttentionSettings.of(model)
    record = settings.asdict() if settings is not None else {"attention": "per-frame",
                                                             "frames_per_pass": plan.frames_per_pass}
    trajectory = [samples.float().cpu()]
    base = model.model

    def keep(i, x):
        """Step i's latent in the LATENT scale it is stored in; the next step continues from what
        that gives back in the model's scale (x / 0.18215 * 0.18215 is not always x in fp32)."""
        stored = base.process_latent_out(x.float()).cpu()
        trajectory.append(stored)
        return base.process_latent_in(stored.to(x.device, x.dtype))

    g = _guider(model, conditioning)
    with returning_memory(), measure(model.load_device) as cost:
        g.sample(
            torch.zeros_like(samples), samples, inversion_sampler(keep),
            torch.tensor(sched.inversion_sigmas, dtype=torch.float32),
            callback=preview_callback(model, steps), disable_pbar=True, seed=0,
        )
    cond, pooled, sizes = single_cond(conditioning, "conditioning")
    if sizes:
        record["size_conditioning"] = sizes
    record.update({"passes": plan.passes, "memory_estimate_mib": round(plan.estimated_bytes / 2**20, 1)})
    # wall time and peak memory of the whole inversion (model loading included when it happens here)
    record.update({"steps": steps, "prediction": prediction, "model_family": model_family(model), **cost.as_dict()})
    return Inversion(
        latents=torch.stack(trajectory),
        timesteps=list(reversed(sched.timesteps)),
        sigmas=torch.tensor(sched.inversion_sigmas, dtype=torch.float64),
        cond=cond.float().cpu(),
        pooled=None if pooled is None else pooled.float().cpu(),
        settings=record,
    )


def attention_mismatch(model, inv: Inversion, node: str) -> str | None:
    """What to tell a user who runs an inversion back with another attention than it was made
    with (the reconstruction then does not return the clip); None when they match."""
    made_with = AttentionSettings.from_record(inv.settings)
    has = AttentionSettings.of(model)
    if same_attention(made_with, has):
        return None
    return (f"{node}: the inversion was made with {describe(made_with)}, but this model has {describe(has)}; "
            "connect the model the clip was inverted with (the same STEM Attention Patch settings)")


def reconstruct(model, inv: Inversion, conditioning=None) -> tuple[torch.Tensor, list[str]]:
    """DDIM sampling back down the inversion's own schedule from its noisiest latent; returns the
    latent and what the user should be told."""
    check_model(model)
    notes = [n for n in [attention_mismatch(model, inv, "STEM Reconstruct")] if n]
    for note in notes:
        log.warning(note)
    conditioning = conditioning if conditioning is not None else inversion_conditioning(inv)
    levels = list(reversed(inv.sigmas.tolist()))
    start = inv.noisiest.clone()
    model = with_cancel_checks(with_plan(model, plan_run(model, start, 1, "STEM Reconstruct")))
    g = _guider(model, conditioning)
    with returning_memory():
        out = g.sample(
            torch.zeros_like(start), start, ddim_sampler(), torch.tensor(levels, dtype=torch.float32),
            callback=preview_callback(model, inv.steps), disable_pbar=True, seed=0,
        )
    return out, notes
