"""Clips in passes (issue 10): one inversion step over F frames in one pass and in passes of n,
each run in a fresh process, with its peak memory above the loaded model, its time, and the
estimate the nodes make before the run (stem.memory).

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python benchmarks/bench_long_clips.py --frames 8 16 32 --size 256
    ... --frames 64 128 --size 256 --passes 8            # only passes of 8
    ... --mode inflated --frames 16 32

Each cell is one process: the checkpoint loads, a 1-frame inversion warms up, then the measured
1-step inversion of the clip. Peak memory is the process's peak resident memory over the
inversion minus what it held before (stem.cost), on the CPU in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(frames: int, size: int, frames_per_pass: int, mode: str) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "comfyui"))
    import comfy_harness as H
    import torch

    pack, model, clip, vae = H.benchmark_session(REPO, "stem-long-")
    inv_nodes = H.pack_submodule(pack, "nodes.inversion_nodes")
    patch = H.pack_submodule(pack, "nodes.attention_patch")
    import nodes

    source = nodes.CLIPTextEncode().encode(clip, "a red disc and a yellow square moving")[0]
    frames_px = torch.from_numpy(H.synth_frames(frames, size, size)).float() / 255.0
    with torch.inference_mode():
        latent = nodes.VAEEncode().encode(vae, frames_px)[0]["samples"]
        del frames_px
        settings = dict(patch.DEFAULT_SETTINGS, attention=mode, frames_per_pass=frames_per_pass)
        m = patch.apply_attention_patch(model, settings)
        inv_nodes.invert(m, latent[:1], source, 1)  # warm-up: model load, first-call costs
        inv = inv_nodes.invert(m, latent, source, 1)
    s = inv.settings
    return {"frames": frames, "size": size, "mode": mode, "frames_per_pass": s["frames_per_pass"], "passes": s["passes"],
            "seconds": s["seconds"], "peak_mib": s["peak_mib"], "estimate_mib": s["memory_estimate_mib"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", nargs="*", type=int, default=[8, 16, 32])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--passes", nargs="*", type=int, default=[0, 8],
                    help="frames a pass; 0 = one pass of all frames")
    ap.add_argument("--mode", default="stem", choices=["stem", "inflated", "per-frame"])
    ap.add_argument("--one", nargs=3, type=int, metavar=("FRAMES", "SIZE", "FRAMES_PER_PASS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.mode)))
        return
    print(f"1-step inversion, {args.mode} attention, {args.size}x{args.size}, CPU fp32; peak above the loaded model\n")
    print("| frames | frames a pass | passes | s/step | peak MiB | estimate MiB | estimate / peak | MiB a frame |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for F in args.frames:
        for n in args.passes:
            n = F if n == 0 else n
            if n > F:
                continue
            out = subprocess.run([sys.executable, __file__, "--mode", args.mode, "--one", str(F), str(args.size), str(n)],
                                 capture_output=True, text=True, env=os.environ)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not lines:
                print(f"| {F} | {n} | failed: {out.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            r = json.loads(lines[-1])
            print(f"| {F} | {r['frames_per_pass']} | {r['passes']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | "
                  f"{r['estimate_mib']:.0f} | {r['estimate_mib'] / max(1.0, r['peak_mib']):.2f} | "
                  f"{r['peak_mib'] / F:.1f} |", flush=True)


if __name__ == "__main__":
    main()
