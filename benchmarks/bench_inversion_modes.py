"""The paper's comparison: per-frame DDIM vs inflated DDIM vs STEM inversion, in ComfyUI.

For each clip size, the same clip is inverted and reconstructed in the three attention modes;
the table gives the time of an inversion step, the peak memory of the inversion (process RSS on
the CPU, allocated memory on CUDA) and the PSNR of the decoded reconstruction against the source
frames. With random weights the PSNR is a plumbing check, not the paper's quality figure.

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m benchmarks.bench_inversion_modes --quick
    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m benchmarks.bench_inversion_modes --sizes 8x256 8x512 --steps 1
    ... --memory-frames 8 16 32 --memory-size 128      # how memory grows with frames, inflated vs stem
    ... --sizes 8x512 --steps 1 --modes per-frame stem  # the 512x512 target without the slow inflated run
    ... --comfy-attention pytorch   # per-frame on SDPA, ComfyUI's choice on NVIDIA (sub_quad on a CPU)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from testbed import clips, comfyui

REPO = Path(__file__).resolve().parents[1]

MODES = ("per-frame", "inflated", "stem")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["8x64", "8x256", "8x512"], help="FRAMESxSIZE cases")
    ap.add_argument("--quick", action="store_true", help="only 8 frames at 64x64")
    ap.add_argument("--steps", type=int, default=2, help="inversion steps per run (time is per step)")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES, help="attention modes to run")
    ap.add_argument("--comfy-attention", default="default", choices=["default", "pytorch", "sub_quad", "split"],
                    help="ComfyUI's attention for SD's own layers (the per-frame mode): 'default' is what ComfyUI "
                         "picks for the device (sub_quad on a CPU), 'pytorch' what it picks on NVIDIA GPUs "
                         "(as with --use-pytorch-cross-attention)")
    ap.add_argument("--memory-frames", nargs="*", type=int, default=[], help="frame counts for the memory-growth table")
    ap.add_argument("--memory-size", type=int, default=128, help="frame size for the memory-growth table")
    args = ap.parse_args()
    sizes = ["8x64"] if args.quick else args.sizes

    pack, model, clip, vae = comfyui.session(REPO, "stem-bench-")
    inv_run = comfyui.pack_submodule(pack, "nodes.host.inversion_run")
    patch = pack.NODE_CLASS_MAPPINGS["STEMAttentionPatch"]()
    metrics = comfyui.pack_submodule(pack, "stem.metrics")
    import comfy.ldm.modules.attention as comfy_attention
    import nodes
    if args.comfy_attention != "default":  # CrossAttention looks these up at every call
        fn = comfy_attention.get_attention_function(args.comfy_attention)
        comfy_attention.optimized_attention = comfy_attention.optimized_attention_masked = fn
    attention_name = comfy_attention.optimized_attention.__name__
    source = nodes.CLIPTextEncode().encode(clip, "a red disc and a yellow square moving")[0]

    def patched(mode: str):  # STEM Attention Patch's defaults
        return patch.patch(model, mode, 256, 5, 0.01, 1, "whole clip", 8)[0]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.steps} inversion steps a run; "
          f"ComfyUI's own attention: {attention_name}\n")
    print("| clip | mode | inversion s/step | peak MiB | reconstruction PSNR (dB) |")
    print("|---|---|---:|---:|---:|")
    with torch.inference_mode():
        inv_run.invert(model, torch.zeros(1, 4, 8, 8), source, 1)  # warm-up: model load
        for case in sizes:
            F, size = (int(v) for v in case.split("x"))
            frames = torch.from_numpy(clips.synth_frames(F, size, size)).float() / 255.0
            latent = nodes.VAEEncode().encode(vae, frames)[0]["samples"]
            for mode in args.modes:
                m = patched(mode)
                try:
                    inv = inv_run.invert(m, latent, source, args.steps)
                except ValueError as e:  # inflated refuses what would not fit
                    print(f"| {F} frames {size}x{size} | {mode} | refused: {e} | | |", flush=True)
                    continue
                rec, _ = inv_run.reconstruct(m, inv)
                decoded = nodes.VAEDecode().decode(vae, {"samples": rec})[0]
                p = metrics.psnr(decoded.float(), frames).mean().item()
                print(f"| {F} frames {size}x{size} | {mode} | {inv.settings['seconds'] / args.steps:.2f} | "
                      f"{inv.settings['peak_mib']:.0f} | {p:.2f} |", flush=True)
        if args.memory_frames:
            print(f"\nPeak memory of a 1-step inversion at {args.memory_size}x{args.memory_size} (MiB):\n")
            print("| frames | " + " | ".join(args.modes) + " |")
            print("|---|" + "---:|" * len(args.modes))
            for F in args.memory_frames:
                frames = torch.from_numpy(clips.synth_frames(F, args.memory_size, args.memory_size)).float() / 255.0
                latent = nodes.VAEEncode().encode(vae, frames)[0]["samples"]
                cells = []
                for mode in args.modes:
                    try:
                        cells.append(f"{inv_run.invert(patched(mode), latent, source, 1).settings['peak_mib']:.0f}")
                    except ValueError:
                        cells.append("refused")
                print(f"| {F} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
