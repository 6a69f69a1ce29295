"""One prepared GPU check: the pack's node path on a CUDA device in half precision, with each
measured CUDA peak beside the estimate the nodes make before the run.

Runs on a machine with PyTorch and a GPU but without ComfyUI installed: it imports ComfyUI's
model code from a checkout (``--comfyui PATH``, whose Python files travel with the pack) and only
the ComfyUI modules the UNet path needs (no server, no ``nodes.py``). Besides torch it needs
ComfyUI's imports of that path; on a CUDA image with torch, torchvision, transformers, safetensors,
einops, psutil, scipy, pyyaml and pillow, what is left is two pure-Python wheels:
``torchsde`` and ``trampoline`` (the README's GPU section).

What it runs (a random-weight SD1.5 UNet built from ComfyUI's own SD15 config, no text encoder or
VAE: random conditioning and latents; ``--sdxl`` adds a full-size random SDXL UNet):

- for each of ``--frames`` (16 and 48) at ``--size`` (512): one inversion step (STEM Invert's run)
  with per-frame attention (SD's own), STEM in one pass, STEM in passes of 8, and inflated
  attention (refused with the pack's message where it would not fit, else run); one TokenFlow
  Edit step on the STEM inversion. Each row: seconds, the CUDA peak above the loaded model
  (``torch.cuda.max_memory_allocated``), the nodes' estimate and their ratio, finite or not;
- the attention layer alone at SD1.5's largest layer (4096 tokens a frame, 320 channels):
  STEM (256 bases, EM included) against per-frame SDPA and inflated attention, in the dtype.

It writes ``gpu_check.json`` and ``gpu_check.md`` (a markdown table) to ``--out``. ``--device cpu
--tiny`` runs the same code in seconds (32-channel UNet, 64x64, 4 frames), as the test
suite does so that it cannot rot::

    python benchmarks/gpu_check.py --comfyui ~/ComfyUI --out gpu-report          # on a GPU, ~3 min
    python benchmarks/gpu_check.py --comfyui ~/ComfyUI --device cpu --tiny --out /tmp/r
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "comfyui_stem_gpu_check"


def bootstrap(comfyui: str, device: str):
    """ComfyUI's model code from the checkout at ``comfyui`` (CPU mode for ``device`` cpu), and the
    pack as a package of its own name without ComfyUI's node loader. Returns ``pack(dotted)``."""
    if not os.path.isfile(os.path.join(comfyui, "comfy", "model_patcher.py")):
        sys.exit(f"--comfyui: no ComfyUI checkout at {comfyui} (the folder holding comfy/ and nodes.py)")
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401

    sys.path.insert(0, str(REPO))  # testbed's random SDXL and its conditioning
    pkg = types.ModuleType(PACK)
    pkg.__path__ = [str(REPO)]
    sys.modules[PACK] = pkg
    return lambda dotted: importlib.import_module(f"{PACK}.{dotted}")


def random_sd15(dtype, device, tiny: bool, seed: int = 0):
    """A ModelPatcher around an SD1.5 UNet from ComfyUI's SD15 config (32 channels with ``tiny``),
    seeded random weights in ``dtype`` on ``device``."""
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    config = sm.SD15({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": dtype, "in_channels": 4,
        "model_channels": 32 if tiny else 320, "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False})
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(p.dtype))
    base.to(device=device, dtype=dtype)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device(device))


def random_sdxl(dtype, device, seed: int = 0):
    """A full-size SDXL UNet (``testbed.models.random_sdxl``: ComfyUI's SDXL classes, random
    weights) in ``dtype`` on ``device``."""
    import torch

    from testbed.models import random_sdxl as build

    m = build(seed=seed, std=0.02)
    m.model.to(device=device, dtype=dtype)
    m.model.diffusion_model.dtype = dtype
    m.model.manual_cast_dtype = None
    m.load_device = m.offload_device = torch.device(device)
    return m


def _cond(width: int, dim: int, seed: int, sdxl: bool = False):
    """Random conditioning as CLIP Text Encode gives it (SDXL's: ``testbed.models.sdxl_conditioning``)."""
    import torch

    if sdxl:
        from testbed.models import sdxl_conditioning

        return sdxl_conditioning(seed, width, width)
    return [[torch.randn(1, 77, dim, generator=torch.Generator().manual_seed(seed)), {}]]


class Case:
    """One row: a label, and what the run reported or the refusal it met."""

    def __init__(self, model: str, frames: int, size: int, run: str):
        self.row = {"model": model, "frames": frames, "size": size, "run": run}

    def done(self, seconds: float, peak_mib: float | None, estimate_mib: float | None, finite: bool, passes: int = 1):
        ratio = round(estimate_mib / peak_mib, 2) if peak_mib and estimate_mib else None
        self.row.update(seconds=round(seconds, 3), peak_mib=peak_mib, estimate_mib=estimate_mib,
                        estimate_over_peak=ratio, finite=finite, passes=passes, outcome="ran")
        return self.row

    def refused(self, message: str):
        self.row.update(outcome="refused", message=message)
        return self.row


def node_rows(pack, name: str, model, cond, frames: int, size: int, device: str) -> list[dict]:
    """One inversion step per attention mode and one TokenFlow Edit step over ``frames`` frames."""
    import torch

    settings, em = pack("nodes.host.settings"), pack("stem.em")
    attn, inv_run, tf = pack("nodes.host.attention_hooks"), pack("nodes.host.inversion_run"), pack("nodes.host.tokenflow_run")
    StemError = pack("nodes.host.pack").StemError
    cost = pack("stem.cost")
    side, per_pass = size // 8, min(8, frames // 2)
    latent = torch.randn(frames, 4, side, side, generator=torch.Generator().manual_seed(1))
    runs = {"per-frame": None,
            "stem, one pass": settings.AttentionSettings(mode="stem", em=em.EMParams(256, 5, 0.01), seed=1),
            f"stem, passes of {per_pass}": settings.AttentionSettings(mode="stem", em=em.EMParams(256, 5, 0.01), seed=1,
                                                                     frames_per_pass=per_pass),
            "inflated": settings.AttentionSettings(mode="inflated", seed=1)}
    rows, stem_inv = [], None
    with torch.inference_mode():
        inv_run.invert(model, latent[:1], cond, 1)  # warm-up: the model moves to the device, kernels load
        for run, s in runs.items():
            case = Case(name, frames, size, run)
            m = model if s is None else attn.patched_model(model, s)
            try:
                inv = inv_run.invert(m, latent, cond, 1)
            except (StemError, ValueError, torch.cuda.OutOfMemoryError if torch.cuda.is_available() else MemoryError) as e:
                rows.append(case.refused(f"{type(e).__name__}: {e}"))
                _free(device)
                continue
            r = inv.settings
            rows.append(case.done(r["seconds"], r["peak_mib"], r["memory_estimate_mib"],
                                  bool(torch.isfinite(inv.latents).all()), r.get("passes", 1)))
            if s is not None and s.mode == "stem" and not s.frames_per_pass:
                stem_inv = inv
            _free(device)
        case = Case(name, frames, size, "TokenFlow Edit, 1 step")
        try:
            with cost.measure(model.load_device) as c:
                edited, trace = tf.tokenflow_edit(model, stem_inv, cond, cond, tf.TokenFlowSettings(batch_size=per_pass),
                                                  progress=False)
            rows.append(case.done(c.seconds, round(c.peak_bytes / 2**20, 1),
                                  round(trace.plan.estimated_bytes / 2**20, 1), bool(torch.isfinite(edited).all()),
                                  trace.plan.passes))
        except (StemError, ValueError) as e:
            rows.append(case.refused(f"{type(e).__name__}: {e}"))
    _free(device)
    return rows


def _free(device: str) -> None:
    import comfy.model_management as mm

    if device != "cpu":
        mm.soft_empty_cache()


def attention_rows(pack, frames_list, tokens: int, dtype, device: str) -> list[dict]:
    """The attention layer alone at SD1.5's largest self-attention: STEM (256 bases, 5 EM
    iterations, EM included) against per-frame SDPA and inflated attention, median of 3."""
    import torch
    import torch.nn.functional as F

    attention, em = pack("stem.attention"), pack("stem.em")
    heads, channels = 8, 320

    def per_frame(q, k, v):
        b, n, _ = q.shape
        split = lambda t: t.view(b, n, heads, -1).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, -1)

    methods = {"per-frame SDPA": per_frame,
               "inflated": lambda q, k, v: attention.full_attention(q, k, v, heads),
               "STEM (256 bases)": lambda q, k, v: attention.stem_attention(q, k, v, heads,
                                                                            em=em.EMParams(256, 5, 0.01).seeded(0))}
    rows = []
    for frames in frames_list:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(frames, tokens, channels, generator=g).to(device, dtype) for _ in range(3))
        for label, fn in methods.items():
            row = {"frames": frames, "tokens": tokens, "method": label, "dtype": str(dtype).split(".")[1]}
            try:
                with torch.inference_mode():
                    fn(q, k, v)  # warm-up
                    times, peak = [], None
                    for _ in range(3):
                        _sync(device)
                        if device != "cpu":
                            base = torch.cuda.memory_allocated()
                            torch.cuda.reset_peak_memory_stats()
                        t0 = time.perf_counter()
                        out = fn(q, k, v)
                        _sync(device)
                        times.append(time.perf_counter() - t0)
                        if device != "cpu":
                            peak = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                row.update(ms=round(sorted(times)[1] * 1000, 2), peak_mib=peak, finite=bool(torch.isfinite(out).all()))
            except (torch.cuda.OutOfMemoryError if torch.cuda.is_available() else MemoryError) as e:
                row.update(ms=None, peak_mib=None, finite=None, message=str(e).splitlines()[0])
            rows.append(row)
            _free(device)
    return rows


def _sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}, {report['dtype']}, torch {report['torch']}", "",
             "| model | frames | size | run | s | peak MiB | estimate MiB | estimate / peak | passes | finite |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in report["nodes"]:
        if r["outcome"] == "refused":
            lines.append(f"| {r['model']} | {r['frames']} | {r['size']} | {r['run']} | refused: {r['message'][:160]} |"
                         " | | | | |")
        else:
            lines.append(f"| {r['model']} | {r['frames']} | {r['size']} | {r['run']} | {r['seconds']} | {r['peak_mib']} | "
                         f"{r['estimate_mib']} | {r['estimate_over_peak']} | {r['passes']} | {r['finite']} |")
    lines += ["", "| attention layer | frames | tokens a frame | ms | peak MiB | finite |", "|---|---:|---:|---:|---:|---|"]
    for r in report["attention"]:
        lines.append(f"| {r['method']} | {r['frames']} | {r['tokens']} | {r['ms']} | {r['peak_mib']} | {r['finite']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("::")[-1])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI"),
                    help="a ComfyUI checkout (default $COMFYUI_PATH or ~/ComfyUI)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="a 32-channel UNet at 64x64, 4 frames: seconds")
    ap.add_argument("--sdxl", action="store_true", help="also a full-size random SDXL UNet at --sdxl-size")
    ap.add_argument("--sdxl-size", type=int, default=1024)
    ap.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    args = ap.parse_args(argv)
    if args.tiny:
        args.frames, args.size = [4], 64
    pack = bootstrap(os.path.abspath(os.path.expanduser(args.comfyui)), args.device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device (use --device cpu --tiny for the smoke run)")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    report = {"device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
              "dtype": args.dtype, "torch": torch.__version__, "tiny": args.tiny, "nodes": [], "attention": []}
    model = random_sd15(dtype, args.device, args.tiny)
    for frames in args.frames:
        report["nodes"] += node_rows(pack, "SD1.5", model, _cond(args.size, 768, 2), frames, args.size,
                                     args.device)
        print(f"SD1.5, {frames} frames: done at {time.perf_counter() - t0:.0f} s", flush=True)
    del model
    if args.sdxl and not args.tiny:
        xl = random_sdxl(dtype, args.device)
        for frames in (4, 8):
            report["nodes"] += node_rows(pack, "SDXL", xl, _cond(args.sdxl_size, 2048, 2, True), frames,
                                         args.sdxl_size, args.device)
        del xl
    tokens = 256 if args.tiny else 4096
    report["attention"] = attention_rows(pack, args.frames[:1] if args.tiny else args.frames, tokens, dtype, args.device)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    bad = [r for r in report["nodes"] if r["outcome"] == "ran" and not r["finite"]]
    bad += [r for r in report["attention"] if r.get("finite") is False]
    if bad:
        print(f"NOT FINITE: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
