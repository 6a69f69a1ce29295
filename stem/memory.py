"""How much memory a UNet call over a clip takes, before it runs (issue 10).

A model of SD1.x/SD2.x's activations in terms of the tokens of one frame at the UNet's first
level (``N = latent height * latent width``), fitted to peaks measured on the CPU in fp32
(``benchmarks/bench_long_clips.py``: 8 to 64 frames at 256x256 in one pass and in passes of 8,
8 frames at 512x512 in one pass and in passes of 4; within 15% of every measured peak there);
bytes scale with the element size.

- A fixed part: buffers that do not grow with the clip (``FIXED_BYTES``).
- A pass that computes holds the working activations of its rows: ``ACTIVE`` bytes per token
  and row (a one-pass inversion grows by about 38 MiB a frame at 256x256, 150 at 512x512).
- A pass that waits at a self-attention (layer-synchronous passes) holds its skip connections
  (1620 channels x N values over SD1.x's 12 skips, 6.6 MB a frame at 256x256) and that layer's
  residual, q, k and v, and what the allocator keeps around them: ``HELD`` bytes per token and
  row (measured: about 20 MiB a frame at 256x256).
- Inflated attention also gathers every frame's keys and values of a layer at once.
"""
from __future__ import annotations

from dataclasses import dataclass

# fp32 bytes per first-level token and batch row; see the module docstring
FIXED_BYTES = 110 * 2**20
ACTIVE_BYTES_PER_TOKEN = 38_900
HELD_BYTES_PER_TOKEN = 20_500
GATHERED_BYTES_PER_TOKEN = 2 * 320 * 4  # inflated: keys and values at the first level (320 channels)
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
                   element_size: int = 4, inflated: bool = False) -> int:
    """Peak bytes above the loaded model of one UNet call over ``frames`` frames (each in
    ``rows_per_frame`` cond chunks) run in passes of ``frames_per_pass``."""
    n = max(1, min(int(frames_per_pass), int(frames)))
    scale = element_size / 4
    active = ACTIVE_BYTES_PER_TOKEN * tokens * n * rows_per_frame
    held = HELD_BYTES_PER_TOKEN * tokens * (frames - n) * rows_per_frame
    gathered = GATHERED_BYTES_PER_TOKEN * tokens * frames * rows_per_frame if inflated and n < frames else 0
    return int(FIXED_BYTES + (active + held + gathered) * scale)


def plan_passes(frames: int, tokens: int, free_bytes: int | None, frames_per_pass: int = 0, rows_per_frame: int = 1,
                element_size: int = 4, inflated: bool = False, share: float = DEFAULT_SHARE) -> tuple[PassPlan, bool]:
    """The pass size to run with, its estimate, and whether that fits ``share`` of
    ``free_bytes`` (None: unknown, anything fits). ``frames_per_pass`` 0 picks the largest
    that fits (one pass when the clip fits; one frame a pass, not fitting, when none does);
    a given one is kept."""
    if frames < 1:
        raise ValueError(f"need at least one frame, got {frames}")
    limit = None if free_bytes is None else share * free_bytes

    def plan(n: int) -> PassPlan:
        return PassPlan(frames, n, rows_per_frame,
                        estimate_bytes(frames, n, tokens, rows_per_frame, element_size, inflated))

    if frames_per_pass > 0:
        p = plan(min(frames, int(frames_per_pass)))
        return p, limit is None or p.estimate_bytes <= limit
    for n in range(frames, 0, -1):
        p = plan(n)
        if limit is None or p.estimate_bytes <= limit:
            return p, True
    return plan(1), False
