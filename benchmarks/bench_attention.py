"""Time and peak memory of STEM attention against the alternatives it replaces.

At SD1.5's largest self-attention layer (N = 64x64 = 4096 tokens per frame, C = 320 =
8 heads x d 40) and for F = 4, 8, 16 frames, one run compares:

- (a) per-frame SDPA self-attention, SD's own (``per_frame_attention`` below);
- (b) full spatio-temporal attention over all F*N tokens (``stem.attention.full_attention``);
- (c) ours: ``stem.attention.stem_attention`` (M = 256 bases, R = 5 EM iterations, EM
  included, automatic token chunking, seeded initialisation);
- (d) the same maths written the way the reference code writes it (REFERENCE §4): a Python
  loop over heads, ``torch.normal`` initialisation on every call, fully materialised
  ``[F*N, M]`` responsibilities and attention weights with an explicit softmax. Before
  anything is timed, (d) is checked against (c) on a small shape with the same initial
  bases, so the two rows time the same computation.

For each F and method it reports the median time over ``--repeats`` runs after one warmup
run (fewer when they would take more than ``--slow-s`` seconds in all, and none when the
warmup alone took longer: then its time is reported) and the peak extra memory, each also
as a ratio to (a). Every (method, F) runs in a fresh spawned process, so allocator caches
and earlier peaks of other cases cannot hide its memory.
"Peak extra" is the peak during the first (warmup) call minus the usage right before it:
on CPU the resident set size (sampled every ~1 ms from /proc/self/statm, plus
``ru_maxrss`` whenever the call raised the process's high-water mark); on CUDA
``torch.cuda.max_memory_allocated``. Inputs are allocated before and do not count; the
output tensor (F*N*C*4 bytes) does. Each row also shows the share of the CPU that other
processes used meanwhile: the timings are only meaningful on an otherwise idle machine.

A last section runs ``stem.em.em_bases`` alone on the keys and values of 120 frames
([1, 8, 120*4096, 40] fp32, ~630 MB each, not counted) with the default chunking, and
compares its extra memory with the 4 GB (3.75 GiB) the unchunked responsibilities alone
would take.
The run ends with the project's targets and whether this run met them.

Run from the pack's folder (a full CPU run takes about 6-8 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.bench_attention              # F = 4, 8, 16 and F = 120 EM
    .venv/bin/python -m benchmarks.bench_attention --quick      # smoke run: F = 2, N = 1024
    .venv/bin/python -m benchmarks.bench_attention --frames 4 8 --max-full-frames 8 --skip-f120
    .venv/bin/python -m benchmarks.bench_attention --device cuda
"""
from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from stem.attention import full_attention, stem_attention
from stem.em import DEFAULT_EM_ITERS, DEFAULT_NUM_BASES, DEFAULT_TAU, EMParams, auto_chunk_size, em_bases, init_bases


def per_frame_attention(q, k, v, heads):
    """SD's own self-attention, SDPA inside each frame, on ``[B, N, heads*d]``."""
    from einops import rearrange

    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    return rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")

# SD1.5's largest self-attention layer (the first down and last up blocks at 512x512).
TOKENS = 64 * 64
CHANNELS = 320
HEADS = 8
QUICK_TOKENS = 32 * 32
EM_FRAMES = 120  # the long-clip case the chunked EM exists for
GIB = 2**30
MIB = 2**20

METHODS = {
    "a": "(a) per-frame SDPA",
    "b": "(b) full attention, F*N tokens",
    "c": "(c) STEM, ours",
    "d": "(d) STEM, reference-style loop",
}


# --------------------------------------------------------------------------------------
# (d): the reference's way of writing STEM attention
# --------------------------------------------------------------------------------------
def reference_stem_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    num_bases: int = DEFAULT_NUM_BASES,
    iters: int = DEFAULT_EM_ITERS,
    tau: float = DEFAULT_TAU,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """STEM attention of one group as the reference code writes it (REFERENCE §4).

    q, k, v: ``[F, N, heads*d]``; returns the same shape. One head at a time; the
    responsibilities ``[F*N, M]`` and the attention weights ``[F*N, M]`` are materialised
    whole and normalised with an explicit softmax. ``init`` (``[heads, M, d]``) replaces
    the reference's ``torch.normal`` draw, for the agreement check with (c).
    """
    B, N, C = q.shape
    d = C // heads
    out = torch.empty_like(q)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        qh, kh, vh = (x[:, :, cols].reshape(B * N, d) for x in (q, k, v))  # [T, d]
        if init is None:
            # The reference draws fresh bases on every call, per channel around the keys' statistics.
            mean, std = kh.mean(dim=0, keepdim=True), kh.std(dim=0, keepdim=True)
            mu = torch.normal(mean.expand(num_bases, d), std.expand(num_bases, d))
        else:
            mu = init[h]
        for _ in range(iters):
            mu_normed = mu / (mu.norm(dim=1, keepdim=True) + 1e-4)
            logits = kh @ mu_normed.T / tau  # [T, M]
            logits = logits - logits.max(dim=1, keepdim=True).values
            z = logits.exp()
            z = z / z.sum(dim=1, keepdim=True)  # E-step: softmax over bases
            zn = z / (z.sum(dim=0, keepdim=True) + 1e-4)  # normalise each basis over tokens
            mu = zn.T @ kh  # M-step
        v_bases = zn.T @ vh
        logits = qh @ mu.T / math.sqrt(d)  # [T, M]: every query against the bases
        logits = logits - logits.max(dim=1, keepdim=True).values
        w = logits.exp()
        w = w / w.sum(dim=1, keepdim=True)
        out[:, :, cols] = (w @ v_bases).view(B, N, d)
    return out


def check_reference_matches_ours(seed: int) -> float:
    """Assert that (d), given (c)'s initial bases, computes what (c) computes.

    Small shape, (d) in fp64 as the exact value; (c) both with its default chunking and
    with a chunk much smaller than the token count. Returns the largest abs difference.
    """
    frames, tokens, heads, d, num_bases = 2, 64, 2, 8, 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(frames, tokens, heads * d, generator=g) for _ in range(3))
    # (c)'s initial bases: the same draw stem_attention makes from a generator with this seed.
    keys = k.view(frames, tokens, heads, d).permute(2, 0, 1, 3).reshape(1, heads, frames * tokens, d)
    init = init_bases(keys, EMParams(num_bases).seeded(seed + 1))[0]
    expected = reference_stem_attention(q.double(), k.double(), v.double(), heads, num_bases, init=init.double())
    worst = 0.0
    for chunk in (None, 40):
        ours = stem_attention(q, k, v, heads, em=EMParams(num_bases, chunk_size=chunk).seeded(seed + 1))
        torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-4)
        worst = max(worst, (ours.double() - expected).abs().max().item())
    # the timed form, with its own torch.normal draw, runs and keeps the shape
    drawn = reference_stem_attention(q, k, v, heads, num_bases)
    assert drawn.shape == q.shape and torch.isfinite(drawn).all()
    return worst


# --------------------------------------------------------------------------------------
# Measuring one case (runs in a fresh spawned process)
# --------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident set size of this process inside a ``with`` block, minus the RSS at
    its start (``.extra``, bytes).

    A thread samples /proc/self/statm every ~1 ms (torch ops release the GIL, so it runs
    during them). ``ru_maxrss`` is exact but a lifetime high-water mark, so it is used only
    when the block raised it; short spikes below an earlier high-water mark rely on the sampler.
    """

    _PAGE = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self._statm = open("/proc/self/statm", "rb", buffering=0)
        self.start = self._rss()
        self._hwm_before = self._hwm()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self._statm.close()
        if self._hwm() > self._hwm_before:
            self.peak = max(self.peak, self._hwm())
        self.extra = self.peak - self.start

    def _rss(self) -> int:
        self._statm.seek(0)
        return int(self._statm.read().split()[1]) * self._PAGE

    @staticmethod
    def _hwm() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())


class OtherLoad:
    """Share of the machine's CPU time that other processes used inside a ``with`` block
    (``.share``, 0..1; None without /proc).

    The machine-wide busy time from /proc/stat minus this process's own CPU time. Printed
    next to each timing because the chunked EM's many short parallel ops slow down far more
    than one big kernel when a core is taken away from an OpenMP thread team.
    """

    def __enter__(self) -> "OtherLoad":
        self._start = self._ticks()
        return self

    def __exit__(self, *exc) -> None:
        end = self._ticks()
        if self._start is None or end is None or end[0] <= self._start[0]:
            self.share = None
            return
        total, busy, own = (e - s for e, s in zip(end, self._start))
        self.share = min(1.0, max(0.0, (busy - own) / total))

    @staticmethod
    def _ticks() -> tuple[int, int, int] | None:
        """(all CPU ticks, busy CPU ticks, this process's ticks), in USER_HZ."""
        try:
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal; utime, stime are fields 14, 15 of stat
        return sum(cpu), sum(cpu) - cpu[3] - cpu[4], int(own[11]) + int(own[12])


class PeakCUDA:
    """Peak allocated CUDA memory inside a ``with`` block, minus the allocation at its start."""

    def __enter__(self) -> "PeakCUDA":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.extra = torch.cuda.max_memory_allocated() - self.start


def _attention_fn(method: str, num_bases: int, iters: int, seed: int):
    """The callable ``fn(q, k, v)`` a method label stands for."""
    if method == "a":
        return lambda q, k, v: per_frame_attention(q, k, v, HEADS)
    if method == "b":
        return lambda q, k, v: full_attention(q, k, v, HEADS, num_chunks=1)
    if method == "c":
        # a fresh seeded generator per call: every call draws the same bases, as in the pack
        return lambda q, k, v: stem_attention(q, k, v, HEADS, em=EMParams(num_bases, iters).seeded(seed))
    if method == "d":
        return lambda q, k, v: reference_stem_attention(q, k, v, HEADS, num_bases, iters)
    raise ValueError(method)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _measure(fn, device: torch.device, repeats: int, slow_s: float) -> dict:
    """A warmup call, with its memory measured, then timed calls.

    A warmup slower than ``slow_s`` is the only run (its time is reported); otherwise the
    repeats are capped at about ``slow_s`` seconds in all, but at least one is made.
    """
    with torch.no_grad(), OtherLoad() as load:
        with (PeakCUDA() if device.type == "cuda" else PeakRSS()) as mem:
            first = _timed(fn, device)
        warmup_only = first > slow_s
        if warmup_only:
            times = [first]
        else:
            times = [_timed(fn, device) for _ in range(max(1, min(repeats, int(slow_s / first))))]
    return {"time": statistics.median(times), "runs": len(times), "warmup_only": warmup_only, "mem": mem.extra,
            "other": load.share}


def run_case(spec: dict) -> dict:
    """Worker entry point: one (method, F) case, or the F = 120 EM case (method "em")."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])  # (d)'s torch.normal draws
    device = torch.device(spec["device"])
    frames, tokens, num_bases, iters = spec["frames"], spec["tokens"], spec["num_bases"], spec["iters"]
    g = torch.Generator().manual_seed(spec["seed"])
    d = CHANNELS // HEADS

    if spec["method"] == "em":
        # Created directly at full size (no temporaries), so input creation cannot leave a
        # high-water mark above the pre-call RSS that would hide the EM's own peak.
        keys, values = (torch.randn(1, HEADS, frames * tokens, d, generator=g).to(device) for _ in range(2))

        def em(x: torch.Tensor, y: torch.Tensor):
            return em_bases(x, y, EMParams(num_bases, iters).seeded(spec["seed"]))

        with torch.no_grad():
            em(keys[..., :512, :], values[..., :512, :])  # load kernels and thread pools first
        result = _measure(lambda: em(keys, values), device, repeats=0, slow_s=0.0)  # one run: ~a minute on 2 cores
        result["chunk"] = auto_chunk_size(HEADS, num_bases)
        return result

    fn = _attention_fn(spec["method"], num_bases, iters, spec["seed"])
    with torch.no_grad():  # load kernels and thread pools on a tiny input, outside the measurement
        fn(*(torch.randn(2, 64, CHANNELS, device=device) for _ in range(3)))
    q, k, v = (torch.randn(frames, tokens, CHANNELS, generator=g).to(device) for _ in range(3))
    return _measure(lambda: fn(q, k, v), device, spec["repeats"], spec["slow_s"])


def in_fresh_process(spec: dict) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_case, (spec,))


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percent(share: float | None) -> str:
    return "?" if share is None else f"{100 * share:.0f}%"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Markdown table with aligned columns (first two left-aligned, numbers right-aligned)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", help="frame counts F (default 4 8 16; 2 with --quick)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warmup (default 3)")
    p.add_argument("--max-full-frames", type=int, default=16, help="skip (b) above this F (default 16; 0 skips it)")
    p.add_argument("--slow-s", type=float, default=30.0,
                   help="a warmup slower than this many seconds is reported alone; faster ones get repeats "
                        "up to about this many seconds in all (default 30)")
    p.add_argument("--skip-f120", action="store_true", help="skip the chunked-EM section at F = 120")
    p.add_argument("--quick", action="store_true", help=f"smoke run: F = 2, N = {QUICK_TOKENS} (the EM section too)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads (default: torch's machine default, %(default)s here)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.frames = args.frames or ([2] if args.quick else [4, 8, 16])
    args.tokens = QUICK_TOKENS if args.quick else TOKENS
    return args


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    num_bases, iters, d = DEFAULT_NUM_BASES, DEFAULT_EM_ITERS, CHANNELS // HEADS
    side = math.isqrt(args.tokens)
    device = args.device + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    print(f"torch {torch.__version__} | {args.threads} threads | CPU: {cpu_name()} ({os.cpu_count()} logical) | device: {device}")
    print(f"layer: N = {side}x{side} = {args.tokens} tokens, C = {CHANNELS} = {HEADS} heads x d {d}, fp32 | "
          f"STEM: M = {num_bases}, R = {iters}, tau = {DEFAULT_TAU}")
    print(f"time: median of up to {args.repeats} runs after 1 warmup (fewer past {args.slow_s:g} s; a slower warmup "
          f"is reported alone); memory: peak extra during the warmup, fresh process per case, output included")
    print("timings assume an otherwise idle machine: 'other CPU' is the share of all cores other processes used meanwhile")
    err = check_reference_matches_ours(args.seed)
    print(f"check: (d) with (c)'s initial bases matches (c) (max abs diff {err:.1e}, small shape, fp64 reference)")
    print(flush=True)

    base = {"tokens": args.tokens, "num_bases": num_bases, "iters": iters, "threads": args.threads,
            "device": args.device, "seed": args.seed, "repeats": args.repeats, "slow_s": args.slow_s}
    results: dict[tuple[int, str], dict | None] = {}
    for frames in args.frames:
        for method in METHODS:
            if method == "b" and frames > args.max_full_frames:
                results[frames, method] = None
                continue
            print(f"  F={frames:<3} {METHODS[method]} ...", end=" ", file=sys.stderr, flush=True)
            r = results[frames, method] = in_fresh_process({**base, "method": method, "frames": frames})
            print(f"{r['time']:.3f} s, {r['mem'] / MIB:.1f} MiB, other CPU {percent(r['other'])}", file=sys.stderr, flush=True)

    rows = []
    for frames in args.frames:
        ref = results[frames, "a"]
        for method, label in METHODS.items():
            r = results[frames, method]
            if r is None:
                rows.append([str(frames), label, "skipped", "", "", "", "", ""])
                continue
            runs = f"{r['runs']}{'*' if r['warmup_only'] else ''}"
            rows.append([str(frames), label, f"{r['time']:.3f}", runs, f"{r['time'] / ref['time']:.2f}x",
                         f"{r['mem'] / MIB:.1f}", f"{r['mem'] / max(ref['mem'], 1):.2f}x", percent(r["other"])])
    print(format_table(["F", "method", "time (s)", "runs", "vs (a)", "peak extra (MiB)", "vs (a)", "other CPU"], rows))
    if any(r and r["warmup_only"] for r in results.values()):
        print(f"runs marked * : the warmup alone, which took longer than --slow-s {args.slow_s:g} s")

    em = None
    if not args.skip_f120:
        tokens = EM_FRAMES * args.tokens
        print(f"\nChunked EM extra memory at F = {EM_FRAMES}, N = {args.tokens}, M = {num_bases}, {HEADS} heads "
              f"(stem.em.em_bases, keys and values [1, {HEADS}, {tokens}, {d}] fp32, "
              f"{HEADS * tokens * d * 4 / MIB:.0f} MiB each, not counted)", flush=True)
        em = in_fresh_process({**base, "method": "em", "frames": EM_FRAMES})
        unchunked = HEADS * tokens * num_bases * 4
        print(f"  default chunk {em['chunk']} tokens ({math.ceil(tokens / em['chunk'])} chunks x {iters} iterations): "
              f"time {em['time']:.2f} s (1 run), peak extra {em['mem'] / MIB:.1f} MiB, other CPU {percent(em['other'])}")
        print(f"  unchunked responsibilities alone would need {HEADS} x {tokens} x {num_bases} x 4 B = "
              f"{unchunked / 1e9:.2f} GB = {unchunked / GIB:.2f} GiB (arithmetic, not run)")

    print("\nTargets:")

    def verdict(ok: bool | None, text: str) -> None:
        print(f"  [{'n/a' if ok is None else 'PASS' if ok else 'FAIL'}] {text}")

    if 16 in args.frames:
        ratio = results[16, "c"]["time"] / results[16, "a"]["time"]
        verdict(ratio <= 1.0, f"(c) time <= 1.0x (a) at F = 16: {ratio:.2f}x")
    else:
        verdict(None, "(c) time <= 1.0x (a) at F = 16: F = 16 not run")
    speedups = {f: results[f, "d"]["time"] / results[f, "c"]["time"] for f in args.frames}
    verdict(min(speedups.values()) >= 3.0, "(c) >= 3x faster than (d) at each F: "
            + ", ".join(f"F = {f}: {s:.1f}x" for f, s in speedups.items()))
    if em is None:
        verdict(None, f"chunked EM at F = {EM_FRAMES}: extra < 1 GiB: skipped")
    else:
        note = "" if args.tokens == TOKENS else f" (N = {args.tokens}, --quick)"
        verdict(em["mem"] < GIB, f"chunked EM at F = {EM_FRAMES}: extra {em['mem'] / MIB:.1f} MiB < 1 GiB{note}")
    busiest = max((r["other"] or 0.0 for r in [*results.values(), em] if r), default=0.0)
    if busiest > 0.05:
        print(f"  note: other processes used up to {percent(busiest)} of the CPU during a case; "
              "those timings are disturbed (rerun on an idle machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
