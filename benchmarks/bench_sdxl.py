"""SDXL end to end on a full-size random-weight UNet (issue 11): STEM inversion, reconstruction
and a TokenFlow edit, with the time and peak memory of each.

The UNet is built in-process from ComfyUI's own SDXL config and classes at SDXL's full widths
(2.6 B parameters, 10 GB in fp32 on the CPU), with seeded random weights; the text encoders and
VAE are left out (random conditioning shaped as CLIP Text Encode SDXL gives it, a random latent),
so this measures the UNet path the nodes run, not quality. Needs about 14 GB of free memory::

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python benchmarks/bench_sdxl.py --frames 8 --size 256 --steps 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="pixels (the latent is size / 8 a side)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="TokenFlow Edit's batch_size")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    import comfy_harness as H
    import torch

    _, skip = H.locate_and_bootstrap()
    if skip:
        sys.exit(f"ComfyUI not available: {skip}")
    import tempfile

    dirs = H.configure_folders(Path(tempfile.mkdtemp(prefix="stem-sdxl-")))
    H.init_comfy_nodes()
    pack = H.load_pack(dirs["custom_nodes"], REPO)
    cost = H.pack_submodule(pack, "stem.cost")
    patch = H.pack_submodule(pack, "nodes.attention_patch")
    inv_nodes = H.pack_submodule(pack, "nodes.inversion_nodes")
    tf = H.pack_submodule(pack, "nodes.host_tokenflow_run")

    t0 = time.perf_counter()
    model = H.random_sdxl(seed=0, std=0.02)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    side = args.size // 8
    latent = torch.randn(args.frames, 4, side, side, generator=torch.Generator().manual_seed(1))
    source = H.sdxl_conditioning(1, args.size, args.size)
    target = H.sdxl_conditioning(2, args.size, args.size)
    negative = H.sdxl_conditioning(3, args.size, args.size)
    out = {"frames": args.frames, "size": args.size, "steps": args.steps, "unet_parameters_m": round(params / 1e6),
           "build_s": round(build_s, 1)}
    with torch.inference_mode():
        stem = patch.apply_attention_patch(model, dict(patch.DEFAULT_SETTINGS))
        inv_nodes.invert(stem, latent[:1], source, 1)  # warm-up: first calls
        inv = inv_nodes.invert(stem, latent, source, args.steps)
        s = inv.settings
        out.update(inversion_s=s["seconds"], inversion_peak_mib=s["peak_mib"], inversion_estimate_mib=s["memory_estimate_mib"])
        with cost.measure() as c:
            rec = inv_nodes.reconstruct(stem, inv)
        out.update(reconstruction_s=round(c.seconds, 1), reconstruction_peak_mib=round(c.peak_bytes / 2**20),
                   reconstruction_max_abs_error=round(float((rec - latent).abs().max()), 4))
        with cost.measure() as c:
            edited, trace = tf.tokenflow_edit(model, inv, target, negative, cfg=7.5, batch_size=args.batch_size,
                                              progress=False)
        out.update(edit_s=round(c.seconds, 1), edit_peak_mib=round(c.peak_bytes / 2**20),
                   edit_estimate_mib=round(trace.plan.estimate_bytes / 2**20), edit_finite=bool(torch.isfinite(edited).all()),
                   pnp=trace.layout.describe())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
