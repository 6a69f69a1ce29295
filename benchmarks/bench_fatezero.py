"""FateZero Edit's memory: measured peaks by step count and clip size, beside what FateZero's way
(storing every step's attention maps, docs/FATEZERO.md §7) would hold, and the estimate the node
makes before a run.

Each cell is one process: the random SD1.5 checkpoint loads, a generated clip is inverted with
STEM (as many steps as the edit), then FateZero Edit runs (refine, FateZero's style defaults) and
its peak resident memory above the process's before the edit is measured (stem.cost), on the CPU
in fp32.

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m benchmarks.bench_fatezero --frames 8 --size 256 --steps 2 4 8
    ... --frames 8 --size 512 --steps 2
    ... --fit 16                  # the longest clip at 512x512 whose estimate fits 16 GiB
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed import clips, comfyui

REPO = Path(__file__).resolve().parents[1]
SOURCE = "a man is playing tennis"


def stored_maps_bytes(frames: int, size: int, steps: int, keys_per_query: int = 1) -> int:
    """What FateZero keeps for an edit: every inversion step's self- and cross-attention maps of the
    SD1.5 layers of at most 32x32 tokens a frame, 8 heads, fp16 (FZ §7). ``keys_per_query``: 1 for
    its zero-shot 'mid' attention, 2 for its default previous-and-first frames."""
    latent = size // 8
    sizes = [latent, -(-latent // 2), -(-latent // 4), -(-latent // 8)]
    layers = [(sizes[1] ** 2, 5), (sizes[2] ** 2, 5), (sizes[3] ** 2, 1)]  # SD1.5: 5, 5 and the middle
    per_step = sum(n * frames * 8 * (n * keys_per_query + 77) * 2 * count for n, count in layers if n <= 32 ** 2)
    if sizes[0] ** 2 <= 32 ** 2:  # a small clip: its first level is stored too
        per_step += sizes[0] ** 2 * frames * 8 * (sizes[0] ** 2 * keys_per_query + 77) * 2 * 5
    return per_step * steps


def one(frames: int, size: int, steps: int) -> dict:
    import torch

    pack, model, clip, vae = comfyui.session(REPO, "stem-fz-bench-")
    import nodes

    cost = comfyui.pack_submodule(pack, "stem.cost")
    fz_run = comfyui.pack_submodule(pack, "nodes.host.fatezero_run")
    with torch.inference_mode():
        pixels = torch.from_numpy(clips.synth_frames(frames, size, size)).float() / 255.0
        latent = nodes.VAEEncode().encode(vae, pixels)[0]
        cond = nodes.CLIPTextEncode().encode(clip, SOURCE)[0]
        stem = pack.NODE_CLASS_MAPPINGS["STEMAttentionPatch"]().patch(model, "stem", 256, 5, 0.01, 1, "whole clip", 8)[0]
        inv = pack.NODE_CLASS_MAPPINGS["STEMInvert"]().invert(stem, latent, cond, steps)[0]
        with cost.measure() as c:
            out, trace = fz_run.fatezero_edit(model, clip, inv, (SOURCE, SOURCE + ", watercolor painting", ""),
                                              fz_run.FateZeroSettings(reweight_words="watercolor painting"),
                                              progress=False)
    return {"frames": frames, "size": size, "steps": steps, "edit_s_per_step": round(c.seconds / steps, 1),
            "peak_mib": round(c.peak_bytes / 2**20), "estimate_mib": round(trace.plan.estimated_bytes / 2**20),
            "passes": trace.plan.passes, "finite": bool(torch.isfinite(out).all()),
            "inversion_peak_mib": inv.settings["peak_mib"]}


def fit(gib: float, size: int) -> None:
    """The longest clip whose FateZero Edit estimate (one pass a branch, and the most frames a pass
    that fit) fits ``gib``, beside what FateZero's stored maps would take at 50 steps."""
    from stem.memory import SD1, CallShape, fatezero_step_bytes

    tokens = (size // 8) ** 2
    budget = gib * 2**30
    print("| frames | estimate, one pass a branch (GiB) | estimate, passes of 8 (GiB) | FateZero's maps, 50 steps "
          "('mid' / default, GiB) |\n|---:|---:|---:|---:|")
    best_one = best_passes = 0
    for frames in (8, 16, 32, 48, 64, 96, 120, 160, 240, 320, 480):
        whole = fatezero_step_bytes(CallShape(frames, tokens, 3, 4, SD1), frames)
        passes = fatezero_step_bytes(CallShape(frames, tokens, 3, 4, SD1), min(8, frames))
        best_one = frames if whole <= budget else best_one
        best_passes = frames if passes <= budget else best_passes
        print(f"| {frames} | {whole / 2**30:.1f} | {passes / 2**30:.1f} | "
              f"{stored_maps_bytes(frames, size, 50) / 2**30:.0f} / {stored_maps_bytes(frames, size, 50, 2) / 2**30:.0f} |")
    print(f"\nwithin {gib:g} GiB at {size}x{size} (fp32 CPU estimate): {best_one} frames in one pass a branch, "
          f"{best_passes} in passes of 8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", nargs="*", type=int, default=[2, 4])
    ap.add_argument("--fit", type=float, metavar="GIB", help="the longest clip whose estimate fits GIB")
    ap.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    if args.fit:
        fit(args.fit, args.size)
        return
    print(f"FateZero Edit, {args.frames} frames at {args.size}x{args.size}, CPU fp32, peak above the process before "
          "the edit\n")
    print("| steps | s/step | peak MiB | estimate MiB | FateZero's stored maps ('mid' / default) MiB |")
    print("|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        r, error = comfyui.fresh_process("benchmarks.bench_fatezero", "--one", str(args.frames), str(args.size),
                                         str(steps), repo_root=REPO)
        if r is None:
            print(f"| {steps} | failed: {error} |", flush=True)
            continue
        stored = [stored_maps_bytes(args.frames, args.size, steps, k) / 2**20 for k in (1, 2)]
        print(f"| {steps} | {r['edit_s_per_step']} | {r['peak_mib']} | {r['estimate_mib']} | "
              f"{stored[0]:.0f} / {stored[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
