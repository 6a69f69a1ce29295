"""SDXL end to end on a full-size random-weight UNet: STEM inversion, reconstruction
and a TokenFlow edit, with the time and peak memory of each.

The UNet is built in-process from ComfyUI's own SDXL config and classes at SDXL's full widths
(2.6 B parameters, 10 GB in fp32 on the CPU), with seeded random weights; the text encoders and
VAE are left out (random conditioning shaped as CLIP Text Encode SDXL gives it, a random latent),
so this measures the UNet path the nodes run, not quality. Needs about 14 GB of free memory::

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m benchmarks.bench_sdxl --frames 8 --size 256 --steps 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from testbed import comfyui, models

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="pixels (the latent is size / 8 a side)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="TokenFlow Edit's batch_size")
    args = ap.parse_args()

    import torch

    _, skip = comfyui.locate_and_bootstrap()
    if skip:
        sys.exit(f"ComfyUI not available: {skip}")
    import tempfile

    dirs = comfyui.configure_folders(Path(tempfile.mkdtemp(prefix="stem-sdxl-")))
    comfyui.init_comfy_nodes()
    pack = comfyui.load_pack(dirs["custom_nodes"], REPO)
    cost = comfyui.pack_submodule(pack, "stem.cost")
    patch = pack.NODE_CLASS_MAPPINGS["STEMAttentionPatch"]()
    inv_run = comfyui.pack_submodule(pack, "nodes.host.inversion_run")
    tf = comfyui.pack_submodule(pack, "nodes.host.tokenflow_run")

    t0 = time.perf_counter()
    model = models.random_sdxl(seed=0, std=0.02)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    side = args.size // 8
    latent = torch.randn(args.frames, 4, side, side, generator=torch.Generator().manual_seed(1))
    source = models.sdxl_conditioning(1, args.size, args.size)
    target = models.sdxl_conditioning(2, args.size, args.size)
    negative = models.sdxl_conditioning(3, args.size, args.size)
    out = {"frames": args.frames, "size": args.size, "steps": args.steps, "unet_parameters_m": round(params / 1e6),
           "build_s": round(build_s, 1)}
    with torch.inference_mode():
        stem = patch.patch(model, "stem", 256, 5, 0.01, 1, "whole clip", 8)[0]  # STEM Attention Patch's defaults
        inv_run.invert(stem, latent[:1], source, 1)  # warm-up: first calls
        inv = inv_run.invert(stem, latent, source, args.steps)
        s = inv.settings
        out.update(inversion_s=s["seconds"], inversion_peak_mib=s["peak_mib"], inversion_estimate_mib=s["memory_estimate_mib"])
        with cost.measure() as c:
            rec, _ = inv_run.reconstruct(stem, inv)
        out.update(reconstruction_s=round(c.seconds, 1), reconstruction_peak_mib=round(c.peak_bytes / 2**20),
                   reconstruction_max_abs_error=round(float((rec - latent).abs().max()), 4))
        with cost.measure() as c:
            settings = tf.TokenFlowSettings(cfg=7.5, batch_size=args.batch_size)
            edited, trace = tf.tokenflow_edit(model, inv, target, negative, settings, progress=False)
        out.update(edit_s=round(c.seconds, 1), edit_peak_mib=round(c.peak_bytes / 2**20),
                   edit_estimate_mib=round(trace.plan.estimated_bytes / 2**20), edit_finite=bool(torch.isfinite(edited).all()),
                   pnp=trace.layout.describe())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
