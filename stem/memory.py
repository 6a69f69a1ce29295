"""How much memory a UNet call over a clip takes, before it runs (issue 10).

A model of a UNet's activations in terms of the tokens of one frame at the UNet's first level
(``N = latent height * latent width``), per family (:class:`Profile`); SD1.x/SD2.x's is fitted
to peaks measured on the CPU in fp32 (``benchmarks/bench_long_clips.py``: 8 to 128 frames at
256x256 in one pass and in passes of 8, 8 frames at 512x512; the table in the README). Bytes
scale with the element size.

- A fixed part: buffers that do not grow with the clip (``fixed``).
- A pass that computes holds the working activations of its rows: ``active`` bytes per token
  and row (a one-pass SD1.5 inversion grows by about 38 MiB a frame at 256x256, 150 at 512x512).
- A pass that waits at a self-attention (layer-synchronous passes) holds its skip connections
  (1620 channels x N values over SD1.x's 12 skips, 6.6 MB a frame at 256x256), that layer's
  input, residual and norm output, and what the allocator keeps around them. STEM and inflated
  passes wait before the layer's projections (``held``: measured 11 MiB a frame at 256x256 from
  32 to 128 frames in passes of 8); TokenFlow's keyframe passes wait in the attention, holding
  the layer's q, k and v as well (``held_qkv``: ``held`` plus three first-level tensors, about
  12 MiB a frame and branch at 256x256; the measured TokenFlow peaks, 240 frames at 256x256,
  were in the propagation passes, so this part is not fitted on its own).
- Inflated attention, and TokenFlow's keyframes in passes, also gather every frame's keys and
  values of a layer at once (``gathered``).
- TokenFlow keeps, for the propagation passes, each keyframe's source ``norm1(x)`` and every
  branch's self-attention output at every self-attention (``record_bytes`` per keyframe: 4
  tensors of ``record_values`` values per first-level token; 2820 on SD1.x).
"""
from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Profile:
    """fp32 bytes per first-level token and batch row of one UNet family (module docstring)."""

    name: str
    fixed: int  # bytes that do not grow with the clip
    active: int  # a frame of the pass that computes
    held: int  # a frame of a pass waiting before a layer's projections (STEM, inflated)
    held_qkv: int  # a frame of a pass waiting in the attention, q, k, v held (TokenFlow's keyframes)
    gathered: int  # keys and values of every frame at the widest shared layer (inflated, TokenFlow)
    record_values: int  # TokenFlow: sum over the self-attentions of tokens x channels
    edit_active: int | None = None  # a frame-branch row of a TokenFlow pass, where it differs from ``active``

    @property
    def record_bytes(self) -> int:
        """TokenFlow's keyframe record per keyframe: source norm1(x) and 3 branches' outputs."""
        return 4 * self.record_values * 4


# SD1.x/SD2.x, fitted to the README's table (CPU, fp32). The record: 5 layers at each of the 3
# levels (N x 320, N/4 x 640, N/16 x 1280) and the middle (N/64 x 1280).
SD1 = Profile("SD1.x/SD2.x", 110 * 2**20, 38_900, 11_500, 12_500, 2 * 320 * 4,
              5 * 320 + 5 * 640 // 4 + 5 * 1280 // 16 + 1280 // 64)
# SDXL: ``active`` and ``edit_active`` from one measured run each (benchmarks/bench_sdxl.py, full-size
# random UNet, 8 frames at 256x256 on the CPU: a 2-step inversion peaked at 363 MiB, a TokenFlow
# edit with batch_size 4 at 1374 MiB); the waiting parts from its layout relative to SD1.x (no
# attention at the first level; 10 transformer blocks at N/4 x 640 and 60 at N/16 x 1280; skip
# connections of about SD1.x's size, 1680 against 1620 values a token), not measured.
SDXL = Profile("SDXL", 110 * 2**20, 32_000, 11_500, 13_000, 2 * 640 // 4 * 4, 10 * 640 // 4 + 60 * 1280 // 16,
               edit_active=89_900)
PROFILES = {p.name: p for p in (SD1, SDXL)}
# what a plan may take of the memory that is free: the rest is headroom for the host
DEFAULT_SHARE = 0.8


@dataclass(frozen=True)
class PassPlan:
    frames: int  # frames of each cond chunk in the call
    frames_per_pass: int
    rows_per_frame: int  # cond chunks per call (2 with CFG, 1 without, 3 in TokenFlow)
    estimate_bytes: int

    @property
    def passes(self) -> int:
        return -(-self.frames // self.frames_per_pass)


def estimate_bytes(frames: int, frames_per_pass: int, tokens: int, rows_per_frame: int = 1,
                   element_size: int = 4, inflated: bool = False, holds_qkv: bool = False, profile: Profile = SD1,
                   edit: bool = False) -> int:
    """Peak bytes above the loaded model of one UNet call over ``frames`` frames (each in
    ``rows_per_frame`` cond chunks) run in passes of ``frames_per_pass``; ``holds_qkv``: the
    passes wait in the attention (TokenFlow's keyframes), not before the projections; ``edit``:
    a TokenFlow pass (``profile.edit_active`` a row where the profile has one)."""
    n = max(1, min(int(frames_per_pass), int(frames)))
    scale = element_size / 4
    active = ((profile.edit_active or profile.active) if edit else profile.active) * tokens * n * rows_per_frame
    per_waiting = profile.held_qkv if holds_qkv else profile.held
    held = per_waiting * tokens * (frames - n) * rows_per_frame
    gathered = profile.gathered * tokens * frames * rows_per_frame if inflated and n < frames else 0
    return int(profile.fixed + (active + held + gathered) * scale)


def plan_passes(frames: int, tokens: int, free_bytes: int | None, frames_per_pass: int = 0, rows_per_frame: int = 1,
                element_size: int = 4, inflated: bool = False, share: float = DEFAULT_SHARE,
                profile: Profile = SD1) -> tuple[PassPlan, bool]:
    """The pass size to run with, its estimate, and whether that fits ``share`` of
    ``free_bytes`` (None: unknown, anything fits). ``frames_per_pass`` 0 picks the largest
    that fits (one pass when the clip fits; one frame a pass, not fitting, when none does);
    a given one is kept."""
    if frames < 1:
        raise ValueError(f"need at least one frame, got {frames}")
    return _search(frames, frames_per_pass, free_bytes, share, lambda n: PassPlan(
        frames, n, rows_per_frame, estimate_bytes(frames, n, tokens, rows_per_frame, element_size, inflated,
                                                  profile=profile)))


def _search(total: int, requested: int, free_bytes: int | None, share: float, plan) -> tuple[PassPlan, bool]:
    """``plan(n)`` for the requested ``n`` (kept, and judged), or with 0 for the largest ``n``
    that fits ``share`` of ``free_bytes`` (``plan(1)``, not fitting, when none does)."""
    limit = None if free_bytes is None else share * free_bytes
    if requested > 0:
        p = plan(min(total, int(requested)))
        return p, limit is None or p.estimate_bytes <= limit
    for n in range(total, 0, -1):
        p = plan(n)
        if limit is None or p.estimate_bytes <= limit:
            return p, True
    return plan(1), False


def tokenflow_estimate_bytes(keyframes: int, keyframes_per_pass: int, batch_size: int, tokens: int,
                             branches: int = 3, element_size: int = 4, profile: Profile = SD1) -> int:
    """Peak bytes above the loaded model of a TokenFlow edit step: the larger of the keyframe
    pass (``keyframes`` keyframes, one per batch, in passes of ``keyframes_per_pass`` that
    gather the edit branches' keys and values) and a propagation pass (``batch_size`` frames),
    plus the keyframe record the propagation passes read. ``branches``: 3, or 2 without CFG."""
    keyframe_pass = estimate_bytes(keyframes, keyframes_per_pass, tokens, branches, element_size,
                                   inflated=True, holds_qkv=True, profile=profile, edit=True)
    propagation = estimate_bytes(batch_size, batch_size, tokens, branches, element_size, profile=profile, edit=True)
    record = profile.record_bytes * tokens * keyframes * element_size // 4
    return max(keyframe_pass, propagation) + record


def plan_tokenflow(keyframes: int, batch_size: int, tokens: int, free_bytes: int | None, keyframes_per_pass: int = 0,
                   branches: int = 3, element_size: int = 4, share: float = DEFAULT_SHARE,
                   profile: Profile = SD1) -> tuple[PassPlan, bool]:
    """:func:`plan_passes` for a TokenFlow edit: keyframes a pass (0 = the most that fit)."""
    if keyframes < 1:
        raise ValueError(f"need at least one keyframe, got {keyframes}")
    return _search(keyframes, keyframes_per_pass, free_bytes, share, lambda n: PassPlan(
        keyframes, n, branches, tokenflow_estimate_bytes(keyframes, n, batch_size, tokens, branches, element_size,
                                                         profile)))


# glibc's allocator (issue 10). On the CPU a tensor is a C allocation. glibc serves a block under
# its mmap threshold from heaps that it does not shrink around live blocks, and the threshold
# rises by itself, up to 32 MiB, each time a larger mapped block is freed: in a torch process
# nearly every activation of a pass below 32 MiB ends up in those heaps. Passes that wait at a
# layer keep their blocks between the blocks that the computing pass frees, so the process keeps
# pages that nothing uses and its resident memory grows by more than the passes hold (measured:
# 15-20 MiB a frame against the 11.5 they hold, at 256x256).
@functools.lru_cache(maxsize=None)
def _glibc():
    """The process's C library where it is glibc (its ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl, for one, has no malloc_trim)
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def return_free_memory() -> bool:
    """Hand the free pages inside glibc's heaps back to the system (``malloc_trim(0)``), so that
    the resident memory is what is held; False where the C library is not glibc. Nothing held
    moves or changes; a page handed back costs a page fault when it is used again."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# How much the resident memory may grow between two hand-backs while passes run (issue 10). A
# hand-back at every meeting made passes about 4% slower at 32 frames of 256x256 (pages handed
# back fault in again when the next pass uses them) and saved about 230 MiB of the peak; handing
# back only after 64 MiB of growth kept nearly all of that saving (peak 654-678 MiB against
# 631-657) at none of the cost. It bounds what the process keeps beyond what it holds to this.
HAND_BACK_GROWTH = 64 * 2**20


class HandBack:
    """When the free pages of a run in passes go back to the system: at a meeting where the
    process's resident memory has grown by at least ``growth`` bytes since the last hand-back
    (or since the start); at every meeting where ``growth`` is 0 or less."""

    def __init__(self, growth: int = HAND_BACK_GROWTH, resident: Callable[[], int] | None = None):
        from .cost import resident_bytes

        self.growth = int(growth)
        self.resident = resident or resident_bytes
        self.mark = self.resident()

    def due(self) -> bool:
        """Has the resident memory grown enough since the last hand-back?"""
        return self.growth <= 0 or self.resident() - self.mark >= self.growth

    def done(self) -> None:
        """The pages went back: growth counts from here."""
        self.mark = self.resident()
