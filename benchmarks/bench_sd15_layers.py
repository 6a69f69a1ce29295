"""STEM against per-frame (and inflated) attention at every self-attention layer of SD1.5 or SDXL.

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
than per-frame attention (levels with fewer tokens a frame than bases).

``--model sdxl`` does the same for SDXL's 70 self-attentions (no attention at the first level;
10 layers at the second, 640 channels in 10 heads; 60 at the third, 1280 channels in 20 heads),
``--inflated`` adds inflated attention (SDPA over all F*N tokens of the clip: ``F^2 * N^2 * C *
2`` multiply-adds) and its ratio to STEM, and ``--low-bases M`` runs STEM with M bases at the
third level (fewer tokens a frame than the default 256 bases at smaller sizes). Layers of one
level have the same shapes, so each level is timed once and counted as many times as it has
layers. No ComfyUI needed::

    .venv/bin/python -m benchmarks.bench_sd15_layers                  # 8 frames, 512x512
    .venv/bin/python -m benchmarks.bench_sd15_layers --size 64 --repeats 10
    .venv/bin/python -m benchmarks.bench_sd15_layers --model sdxl --size 1024 --frames 16 --inflated --repeats 1
"""
from __future__ import annotations

import argparse
import time

import torch

from stem.attention import full_attention, stem_attention
from stem.em import DEFAULT_EM_ITERS, DEFAULT_NUM_BASES, EMParams


def per_frame_attention(q, k, v, heads):
    """SD's own self-attention, SDPA inside each frame, on ``[B, N, heads*d]``."""
    from einops import rearrange

    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    return rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")

# (level, channels, heads, layers)
MODELS = {
    "sd15": [(0, 320, 8, 5), (1, 640, 8, 5), (2, 1280, 8, 5), (3, 1280, 8, 1)],
    "sdxl": [(1, 640, 10, 10), (2, 1280, 20, 60)],
}


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
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="frame size in pixels (a multiple of 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inflated", action="store_true", help="also time inflated attention over all frames")
    ap.add_argument("--low-bases", type=int, default=0, help="STEM bases at the deepest level (0: the default 256)")
    args = ap.parse_args()
    if args.size % 64:
        ap.error("--size must be a multiple of 64")
    F, R = args.frames, DEFAULT_EM_ITERS
    levels = MODELS[args.model]
    deepest = max(level for level, *_ in levels)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32; {args.model}, {F} frames at "
          f"{args.size}x{args.size}; STEM M = {DEFAULT_NUM_BASES} (deepest level {args.low_bases or DEFAULT_NUM_BASES}), "
          f"R = {R}; median of {args.repeats} runs per level\n")
    head = "| tokens a frame | C | heads | layers | per-frame ms | STEM ms | STEM/per-frame | per-frame GMAC | STEM GMAC |"
    if args.inflated:
        head += " inflated ms | STEM/inflated | inflated GMAC |"
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    total = {k: 0.0 for k in ("pf", "stem", "inf", "pf_mac", "stem_mac", "inf_mac")}
    gen = torch.Generator().manual_seed(0)
    for level, C, heads, layers in levels:
        side = args.size // 8 // 2**level
        N = side * side
        M = args.low_bases if args.low_bases and level == deepest else DEFAULT_NUM_BASES
        q, k, v = (torch.randn(F, N, C, generator=gen) for _ in range(3))
        with torch.no_grad():
            t_pf = median_time(lambda: per_frame_attention(q, k, v, heads), args.repeats)
            t_stem = median_time(lambda: stem_attention(q, k, v, heads, em=EMParams(M).seeded(1)), args.repeats)
            t_inf = median_time(lambda: full_attention(q, k, v, heads), args.repeats) if args.inflated else 0.0
        mac_pf, mac_stem, mac_inf = F * N * N * C * 2, F * N * M * C * (2 * R + 3), F * F * N * N * C * 2
        for key, value in (("pf", t_pf), ("stem", t_stem), ("inf", t_inf), ("pf_mac", mac_pf), ("stem_mac", mac_stem),
                           ("inf_mac", mac_inf)):
            total[key] += layers * value
        row = (f"| {N} | {C} | {heads} | {layers} | {t_pf * 1e3:.1f} | {t_stem * 1e3:.1f} | {t_stem / t_pf:.2f}x | "
               f"{mac_pf / 1e9:.2f} | {mac_stem / 1e9:.2f} |")
        if args.inflated:
            row += f" {t_inf * 1e3:.0f} | {t_stem / t_inf:.3f}x | {mac_inf / 1e9:.1f} |"
        print(row, flush=True)
    n_layers = sum(layers for *_, layers in levels)
    row = (f"| all {n_layers} layers | | | {n_layers} | {total['pf'] * 1e3:.0f} | {total['stem'] * 1e3:.0f} | "
           f"{total['stem'] / total['pf']:.2f}x | {total['pf_mac'] / 1e9:.1f} | {total['stem_mac'] / 1e9:.1f} |")
    if args.inflated:
        row += f" {total['inf'] * 1e3:.0f} | {total['stem'] / total['inf']:.3f}x | {total['inf_mac'] / 1e9:.1f} |"
    print(row)
    print(f"\nthroughput: per-frame {total['pf_mac'] / total['pf'] / 1e9:.0f} GMAC/s, "
          f"STEM {total['stem_mac'] / total['stem'] / 1e9:.0f} GMAC/s; multiply-adds a frame, all layers: "
          f"per-frame {total['pf_mac'] / F / 1e9:.1f} G, STEM {total['stem_mac'] / F / 1e9:.1f} G")


if __name__ == "__main__":
    main()
