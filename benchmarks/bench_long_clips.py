"""Clips in passes: one inversion step over F frames in one pass and in passes of n,
each run in a fresh process, with its peak memory above the loaded model, its time, and the
estimate the nodes make before the run (stem.memory).

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m benchmarks.bench_long_clips --frames 8 16 32 --size 256
    ... --frames 64 128 --size 256 --passes 8            # only passes of 8
    ... --mode inflated --frames 16 32
    ... --time-pairs 32 256 8 3                          # time only: one pass and passes, alternating

Time is noisy on a shared machine (+-15% between runs of one cell). ``--time-pairs F SIZE N R``
times one step of F frames in one pass and in passes of N, R times each, alternating (and
swapping which goes first) in one process on one encoded latent, so that drift of the machine
falls on both alike; it prints every run, the medians and their ratio.

Each cell is one process: the checkpoint loads, a 1-frame inversion warms up, then the measured
1-step inversion of the clip. Peak memory is the process's peak resident memory over the
inversion minus what it held before (stem.cost), on the CPU in fp32.

End to end: a generated clip written as an mp4, loaded by Load Video Frames, encoded,
inverted with STEM in passes and edited with TokenFlow in keyframe passes, one step each:

    ... -m benchmarks.bench_long_clips --e2e 240 --size 256 --passes 8 --keyframes-per-pass 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from testbed import clips, comfyui, models

REPO = Path(__file__).resolve().parents[1]


def _clip_session(prefix: str, frames: int, size: int, model_name: str = "sd15", synthetic: bool = False):
    """ComfyUI with this pack loaded and a model (the random SD1.5 checkpoint, or with ``sdxl`` a
    full-size random SDXL UNet), a clip's latent of ``frames`` frames (a generated clip encoded, or
    a seeded random latent of its shape where ``synthetic`` or SDXL: memory and time do not depend on
    the content) and its source cond: (pack, inversion run module, patched(mode, frames_per_pass),
    source cond, latent)."""
    import torch

    side = size // 8
    noise = lambda: torch.randn(frames, 4, side, side, generator=torch.Generator().manual_seed(1))  # noqa: E731
    if model_name == "sdxl":
        import tempfile

        _, skip = comfyui.locate_and_bootstrap()
        if skip:
            sys.exit(f"ComfyUI not available: {skip}")
        dirs = comfyui.configure_folders(Path(tempfile.mkdtemp(prefix=prefix)))
        comfyui.init_comfy_nodes()
        pack = comfyui.load_pack(dirs["custom_nodes"], REPO)
        model = models.random_sdxl(seed=0, std=0.02)
        source, latent = models.sdxl_conditioning(1, size, size), noise()
    else:
        pack, model, clip, vae = comfyui.session(REPO, prefix)
        import nodes

        source = nodes.CLIPTextEncode().encode(clip, "a red disc and a yellow square moving")[0]
        if synthetic:
            latent = noise()
        else:
            with torch.inference_mode():
                frames_px = torch.from_numpy(clips.synth_frames(frames, size, size)).float() / 255.0
                latent = nodes.VAEEncode().encode(vae, frames_px)[0]["samples"]
    patch = pack.NODE_CLASS_MAPPINGS["STEMAttentionPatch"]()

    def patched(mode: str, frames_per_pass: int):  # STEM Attention Patch's defaults otherwise
        return patch.patch(model, mode, 256, 5, 0.01, 1, "whole clip", 8, frames_per_pass)[0]

    return pack, comfyui.pack_submodule(pack, "nodes.host.inversion_run"), patched, source, latent


def cancel_latency(run, after: float) -> float | None:
    """Seconds from a press of Cancel (ComfyUI's interruption, from another thread ``after`` seconds
    into ``run()``) to ``run`` ending with ComfyUI's interruption; None where it ended first."""
    import threading
    import time

    import comfy.model_management as mm

    pressed: list[float] = []
    timer = threading.Timer(after, lambda: pressed.append(time.perf_counter()) or mm.interrupt_current_processing(True))
    timer.start()
    try:
        run()
    except mm.InterruptProcessingException:
        return round(time.perf_counter() - pressed[0], 2)
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    return None


def one(frames: int, size: int, frames_per_pass: int, mode: str, model_name: str = "sd15",
        synthetic: bool = False, cancel: bool = False, unchecked: bool = False) -> dict:
    import torch

    pack, inv_run, patched, source, latent = _clip_session("stem-long-", frames, size, model_name, synthetic)
    if unchecked:  # measure a cell that the estimate would refuse: the plan sees no memory limit
        comfyui.pack_submodule(pack, "nodes.host.plans")._free_for_run = lambda model: None
    with torch.inference_mode():
        m = patched(mode, frames_per_pass)
        inv_run.invert(m, latent[:1], source, 1)  # warm-up: model load, first-call costs
        inv = inv_run.invert(m, latent, source, 1)
        s = inv.settings
        # pressed 20 s into the step (the first level's layers, the largest per frame), or halfway in a shorter one
        cancel_s = cancel_latency(lambda: inv_run.invert(m, latent, source, 1), min(20.0, s["seconds"] / 2)) if cancel else None
    return {"model": model_name, "frames": frames, "size": size, "mode": mode, "frames_per_pass": s["frames_per_pass"],
            "passes": s["passes"], "cancel_s": cancel_s,
            "seconds": s["seconds"], "peak_mib": s["peak_mib"], "estimate_mib": s["memory_estimate_mib"]}


def time_pairs(frames: int, size: int, frames_per_pass: int, repeats: int, mode: str) -> dict:
    import statistics

    import torch

    if not 0 < frames_per_pass < frames:
        sys.exit(f"--time-pairs: FRAMES_PER_PASS must be between 1 and FRAMES - 1, got {frames_per_pass}")
    pack, inv_run, patched, source, latent = _clip_session("stem-pairs-", frames, size)
    times: dict[int, list[float]] = {frames: [], frames_per_pass: []}
    with torch.inference_mode():
        models = {n: patched(mode, n) for n in times}
        for m in models.values():
            inv_run.invert(m, latent[:1], source, 1)  # warm-up
        for r in range(repeats):
            order = list(times) if r % 2 == 0 else list(times)[::-1]
            for n in order:
                inv = inv_run.invert(models[n], latent, source, 1)
                assert inv.settings["passes"] == -(-frames // n), inv.settings
                times[n].append(inv.settings["seconds"])
                print(f"run {r + 1}: {inv.settings['passes']} pass(es) of {n}: {inv.settings['seconds']:.1f} s",
                      file=sys.stderr, flush=True)
    one, passes = statistics.median(times[frames]), statistics.median(times[frames_per_pass])
    return {"frames": frames, "size": size, "mode": mode, "frames_per_pass": frames_per_pass,
            "one_pass_s": times[frames], "passes_s": times[frames_per_pass],
            "median_one_pass_s": one, "median_passes_s": passes, "passes_over_one_pass": round(passes / one, 3)}


def e2e(frames: int, size: int, frames_per_pass: int, keyframes_per_pass: int, batch_size: int) -> dict:
    import torch

    pack, model, clip, vae = comfyui.session(REPO, "stem-e2e-")
    import folder_paths
    import nodes

    cost = comfyui.pack_submodule(pack, "stem.cost")
    measure, resident_bytes = cost.measure, cost.resident_bytes
    clips.write_video_clip(Path(folder_paths.get_input_directory()) / "long_clip.mp4", frames, size, size)
    loader = pack.NODE_CLASS_MAPPINGS["STEMLoadVideoFrames"]()
    patch = pack.NODE_CLASS_MAPPINGS["STEMAttentionPatch"]()
    inv_run = comfyui.pack_submodule(pack, "nodes.host.inversion_run")
    tf = comfyui.pack_submodule(pack, "nodes.host.tokenflow_run")
    source = nodes.CLIPTextEncode().encode(clip, "a red disc and a yellow square moving")[0]
    target = nodes.CLIPTextEncode().encode(clip, "a blue ball and a green box moving")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "ugly, blurry, low res")[0]
    base = resident_bytes()
    out = {"frames": frames, "size": size}
    with torch.inference_mode():
        with measure() as c:
            images = loader.load("long_clip.mp4", 0, 0, 1, size, False)[0]
        out["load_s"], out["frames_loaded"] = round(c.seconds, 1), images.shape[0]
        with measure() as c:
            latent = nodes.VAEEncode().encode(vae, images)[0]["samples"]
            del images
        out["encode_s"] = round(c.seconds, 1)
        m = patch.patch(model, "stem", 256, 5, 0.01, 1, "whole clip", 8, frames_per_pass)[0]
        inv = inv_run.invert(m, latent, source, 1)
        s = inv.settings
        out.update(inversion_s=s["seconds"], inversion_peak_mib=s["peak_mib"], inversion_estimate_mib=s["memory_estimate_mib"],
                   inversion_passes=s["passes"], inversion_fp32_mib=round(inv.latents.numel() * 4 / 2**20, 1),
                   inversion_fp16_mib=round(inv.latents.numel() * 2 / 2**20, 1))
        with measure() as c:
            settings = tf.TokenFlowSettings(cfg=7.5, batch_size=batch_size, steps=1, keyframes_per_pass=keyframes_per_pass)
            edited, trace = tf.tokenflow_edit(model, inv, target, negative, settings, progress=False)
        out.update(edit_s=round(c.seconds, 1), edit_peak_mib=round(c.peak_bytes / 2**20, 1),
                   edit_estimate_mib=round(trace.plan.estimated_bytes / 2**20, 1), keyframes=trace.plan.frames,
                   keyframe_passes=trace.plan.passes, edited_finite=bool(torch.isfinite(edited).all()))
    out["process_above_start_mib"] = round((resident_bytes() - base) / 2**20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", nargs="*", type=int, default=[8, 16, 32])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--passes", nargs="*", type=int, default=[0, 8],
                    help="frames a pass; 0 = one pass of all frames")
    ap.add_argument("--mode", default="stem", choices=["stem", "inflated", "per-frame"])
    ap.add_argument("--model", default="sd15", choices=["sd15", "sdxl"],
                    help="sdxl: a full-size random SDXL UNet (10 GB in fp32) on a random latent")
    ap.add_argument("--cancel", action="store_true",
                    help="also press Cancel 20 s into a second run of the step (halfway in a shorter one): seconds until it ends")
    ap.add_argument("--unchecked", action="store_true",
                    help="no memory check before the run (to measure cells the estimate refuses)")
    ap.add_argument("--synthetic-latent", action="store_true",
                    help="a seeded random latent instead of an encoded clip (no VAE time; same memory and time)")
    ap.add_argument("--one", nargs=3, type=int, metavar=("FRAMES", "SIZE", "FRAMES_PER_PASS"), help=argparse.SUPPRESS)
    ap.add_argument("--e2e", type=int, metavar="FRAMES", help="load, invert and edit a generated clip of FRAMES frames")
    ap.add_argument("--time-pairs", nargs=4, type=int, metavar=("FRAMES", "SIZE", "FRAMES_PER_PASS", "REPEATS"),
                    help="time one pass against passes, alternating in one process")
    ap.add_argument("--keyframes-per-pass", type=int, default=4, help="TokenFlow Edit's keyframes_per_pass in --e2e")
    ap.add_argument("--batch-size", type=int, default=8, help="TokenFlow Edit's batch_size in --e2e")
    args = ap.parse_args()
    if args.e2e:
        n = args.passes[-1] if args.passes else 8
        print(json.dumps(e2e(args.e2e, args.size, n, args.keyframes_per_pass, args.batch_size)))
        return
    if args.time_pairs:
        print(json.dumps(time_pairs(*args.time_pairs, args.mode)))
        return
    if args.one:
        print(json.dumps(one(*args.one, args.mode, args.model, args.synthetic_latent, args.cancel,
                             args.unchecked)))
        return
    print(f"1-step inversion, {args.model}, {args.mode} attention, {args.size}x{args.size}, CPU fp32; "
          "peak above the loaded model\n")
    print("| frames | frames a pass | passes | s/step | peak MiB | estimate MiB | estimate / peak | MiB a frame | Cancel s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for F in args.frames:
        for n in args.passes:
            n = F if n == 0 else n
            if n > F:
                continue
            extra = (["--synthetic-latent"] * args.synthetic_latent + ["--cancel"] * args.cancel
                     + ["--unchecked"] * args.unchecked)
            r, error = comfyui.fresh_process("benchmarks.bench_long_clips", "--mode", args.mode, "--model", args.model,
                                             *extra, "--one", str(F), str(args.size), str(n), repo_root=REPO)
            if r is None:
                print(f"| {F} | {n} | failed: {error} |", flush=True)
                continue
            print(f"| {F} | {r['frames_per_pass']} | {r['passes']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | "
                  f"{r['estimate_mib']:.0f} | {r['estimate_mib'] / max(1.0, r['peak_mib']):.2f} | "
                  f"{r['peak_mib'] / F:.1f} | {'' if r['cancel_s'] is None else r['cancel_s']} |", flush=True)


if __name__ == "__main__":
    main()
