"""STEM against per-frame attention at every self-attention layer of SD1.5, for one clip size.

SD1.5's UNet has 16 self-attentions: 5 at each of the three finest levels (2 in the encoder,
3 in the decoder) and 1 in the middle block. For a clip of F frames at S x S pixels, level l
has (S / 8 / 2^l)^2 tokens a frame and 320 / 640 / 1280 / 1280 channels (8 heads). This
prints, per level, the time of ``per_frame_attention`` below (SDPA, SD's own
attention) and ``stem.attention.stem_attention`` (256 bases, 5 EM iterations, EM included) on
random q, k, v, with the multiply-adds each needs:

- per-frame: ``F * N^2 * C * 2`` (scores and weighted sum);
- STEM: ``F * N * M * C * (2R + 3)`` (R iterations of E- and M-step products, the value bases,
  then scores and weighted sum against the M bases).

The summed rows show where STEM gains (the 4096-token layers at 512 px) and where it pays more
than per-frame attention (levels with fewer tokens a frame than bases). No ComfyUI needed::

    .venv/bin/python benchmarks/bench_sd15_layers.py                  # 8 frames, 512x512
    .venv/bin/python benchmarks/bench_sd15_layers.py --size 64 --repeats 10
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stem.attention import stem_attention  # noqa: E402
from stem.em import DEFAULT_EM_ITERS, DEFAULT_NUM_BASES  # noqa: E402


def per_frame_attention(q, k, v, heads):
    """SD's own self-attention, SDPA inside each frame, on ``[B, N, heads*d]``."""
    from einops import rearrange

    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    return rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")

HEADS = 8
LEVELS = [(0, 320, 5), (1, 640, 5), (2, 1280, 5), (3, 1280, 1)]  # (level, channels, layers)


def median_time(fn, repeats: int) -> float:
    fn()  # warmup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="frame size in pixels (a multiple of 64)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.size % 64:
        ap.error("--size must be a multiple of 64")
    F, M, R = args.frames, DEFAULT_NUM_BASES, DEFAULT_EM_ITERS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32; {F} frames at "
          f"{args.size}x{args.size}; STEM M = {M}, R = {R}; median of {args.repeats} runs per layer\n")
    print("| tokens a frame | C | layers | per-frame ms | STEM ms | STEM/per-frame | per-frame GMAC | STEM GMAC |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = {"pf": 0.0, "stem": 0.0, "pf_mac": 0.0, "stem_mac": 0.0}
    gen = torch.Generator().manual_seed(0)
    for level, C, layers in LEVELS:
        side = args.size // 8 // 2**level
        N = side * side
        q, k, v = (torch.randn(F, N, C, generator=gen) for _ in range(3))
        with torch.no_grad():
            t_pf = median_time(lambda: per_frame_attention(q, k, v, HEADS), args.repeats)
            t_stem = median_time(lambda: stem_attention(q, k, v, HEADS, generator=torch.Generator().manual_seed(1)),
                                 args.repeats)
        mac_pf, mac_stem = F * N * N * C * 2, F * N * M * C * (2 * R + 3)
        total["pf"] += layers * t_pf
        total["stem"] += layers * t_stem
        total["pf_mac"] += layers * mac_pf
        total["stem_mac"] += layers * mac_stem
        print(f"| {N} | {C} | {layers} | {t_pf * 1e3:.1f} | {t_stem * 1e3:.1f} | {t_stem / t_pf:.2f}x | "
              f"{mac_pf / 1e9:.2f} | {mac_stem / 1e9:.2f} |", flush=True)
    print(f"| all 16 layers | | 16 | {total['pf'] * 1e3:.0f} | {total['stem'] * 1e3:.0f} | "
          f"{total['stem'] / total['pf']:.2f}x | {total['pf_mac'] / 1e9:.1f} | {total['stem_mac'] / 1e9:.1f} |")
    print(f"\nthroughput: per-frame {total['pf_mac'] / total['pf'] / 1e9:.0f} GMAC/s, "
          f"STEM {total['stem_mac'] / total['stem'] / 1e9:.0f} GMAC/s; multiply-adds a frame, all layers: "
          f"per-frame {total['pf_mac'] / F / 1e9:.1f} G, STEM {total['stem_mac'] / F / 1e9:.1f} G")


if __name__ == "__main__":
    main()
