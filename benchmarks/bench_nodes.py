"""Node-path timings in a real ComfyUI on the random-weight SD1.5 checkpoint.

Per step, in seconds: vanilla (per-frame) DDIM inversion, STEM inversion, DDIM reconstruction,
and a TokenFlow Edit step (FreeU at the reference values, batch_size 8, cfg 7.5), for 8 frames
at 64x64 and 16 frames at 128x128. Also the inversion->reconstruction error per inversion.

Run it in ComfyUI's interpreter, on an otherwise idle machine (another process on the cores
can slow CPU runs several times over):

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m benchmarks.bench_nodes [--steps 3]

It uses the repository's test bed (testbed/) to import ComfyUI in CPU mode, load this repo as a
custom node pack and build (or reuse) the random checkpoint.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from testbed import clips, comfyui

REPO = Path(__file__).resolve().parents[1]

FREEU = dict(b1=1.2, b2=1.4, s1=0.9, s2=0.2)  # REFERENCE §5.5


def per_step(fn, steps: int) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) / steps, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="steps per timed run (the per-step time is the mean)")
    ap.add_argument("--sizes", nargs="*", default=["8x64", "16x128"], help="FRAMESxSIZE cases")
    args = ap.parse_args()

    pack, model, clip, vae = comfyui.session(REPO, "stem-bench-")
    inv_run = comfyui.pack_submodule(pack, "nodes.host.inversion_run")
    tokenflow = pack.NODE_CLASS_MAPPINGS["STEMTokenFlowEdit"]()
    import comfy_extras.nodes_freelunch as freelunch
    import nodes
    enc = nodes.CLIPTextEncode()
    source = enc.encode(clip, "a man is playing tennis")[0]
    target = enc.encode(clip, "spider-man is playing tennis")[0]
    negative = enc.encode(clip, "ugly, blurry, low res, unrealistic, unaesthetic")[0]
    stem_model = pack.NODE_CLASS_MAPPINGS["STEMAttentionPatch"]().patch(model, "stem", 256, 5, 0.01, 1, "whole clip", 8)[0]
    edit_model = freelunch.FreeU().patch(model, **FREEU)[0]
    S = args.steps

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; ComfyUI at {comfyui.comfyui_path()}; {S} steps a run\n")
    print("| clip | vanilla inversion | STEM inversion | STEM / vanilla | reconstruction | TokenFlow Edit | recon error vanilla | recon error STEM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for case in args.sizes:
            F, size = (int(v) for v in case.split("x"))
            frames = torch.from_numpy(clips.synth_frames(F, size, size)).float() / 255.0
            latent = nodes.VAEEncode().encode(vae, frames)[0]["samples"]
            inv_run.invert(model, latent, source, 1)  # warm-up: model load, first-call costs
            t_van, inv_v = per_step(lambda: inv_run.invert(model, latent, source, S), S)
            t_stem, inv_s = per_step(lambda: inv_run.invert(stem_model, latent, source, S), S)
            t_rec, (rec_s, _) = per_step(lambda: inv_run.reconstruct(stem_model, inv_s), S)
            rec_v, _ = inv_run.reconstruct(model, inv_v)
            bs = min(8, F)
            t_edit, _ = per_step(lambda: tokenflow.edit(edit_model, inv_s, target, negative, 7.5, 0.5, 0.8, bs, 1), S)
            err_v = (rec_v - latent).abs().mean().item()
            err_s = (rec_s - latent).abs().mean().item()
            print(f"| {F} frames {size}x{size} | {t_van:.2f} s | {t_stem:.2f} s | {t_stem / t_van:.2f}x | {t_rec:.2f} s | "
                  f"{t_edit:.2f} s | {err_v:.3f} | {err_s:.3f} |", flush=True)
    print("\nTargets: STEM inversion step <= 1.05x vanilla at 8 frames 64x64; "
          "TokenFlow Edit step <= 2.9 s at 8 frames 64x64 (the authors' code, fp32, 2-core CPU).")
    print("Reconstruction errors are mean |latent difference| after a few steps of a random-weight model: "
          "a plumbing check, not a quality measure.")


if __name__ == "__main__":
    main()
