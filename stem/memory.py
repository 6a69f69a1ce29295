"""How much memory a UNet call over a clip takes, before it runs.

A model of a UNet's activations in terms of the tokens of one frame at the UNet's first level
(``N = latent height * latent width``), per family (:class:`Profile`), fitted to peaks measured
with ``benchmarks/bench_long_clips.py`` (the README's tables). Bytes scale with the element
size. A call is described by a :class:`CallShape`; :func:`call_bytes` estimates it in passes
of a given size, :func:`plan_passes` picks the size, and :func:`tokenflow_step_bytes` /
:func:`plan_tokenflow` do the same for a TokenFlow step.

- A fixed part: buffers that do not grow with the clip (``fixed``).
- A pass that computes holds the working activations of its rows: ``active`` bytes per token
  and row for its first :data:`CHUNK_TOKENS` token-rows, ``beyond`` for each further one. The
  per-frame modules (ResBlocks, samplers, feed-forwards) run a large pass in chunks of rows
  (``stem.chunks``, for Cancel), so their intermediates stop growing at a chunk's size; what
  still grows with the pass is what it keeps whole (each block's output, skip connections, the
  attention layers' q, k, v).
- A pass that waits at a self-attention (layer-synchronous passes) holds its skip connections,
  that layer's input, residual and norm output, and what the allocator keeps around them.
  STEM and inflated passes wait before the layer's projections (``held``); TokenFlow's keyframe
  passes wait in the attention, holding the layer's q, k and v as well (``held_qkv``: ``held``
  plus three first-level tensors).
- Inflated attention, and TokenFlow's keyframes in passes, also gather every frame's keys and
  values of a layer at once (``gathered``).
- A FateZero step runs each branch (source, target, negative) in passes of its own frames that
  wait in the attention, and makes explicit cross-attention probabilities a block at a time
  (:func:`fatezero_step_bytes`).
- TokenFlow keeps, for the propagation passes, each keyframe's source ``norm1(x)`` and every
  branch's self-attention output at every self-attention (``record_bytes`` per keyframe: 4
  tensors of ``record_values`` values per first-level token).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .chunks import WORK_PER_CHUNK

# first-level token-rows that the per-frame modules compute at once (a chunk at 320 channels: 8
# frames at 512x512, 32 at 256x256)
CHUNK_TOKENS = WORK_PER_CHUNK // (320 * 320)


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
    beyond: int | None = None  # a token-row of a computing pass beyond CHUNK_TOKENS (None: ``active``)

    @property
    def record_bytes(self) -> int:
        """TokenFlow's keyframe record per keyframe: source norm1(x) and 3 branches' outputs."""
        return 4 * self.record_values * 4


# SD1.x/SD2.x, fitted to the README's tables (CPU, fp32): ``active`` at 256x256 and at 8 frames of
# 512x512, ``beyond`` at 32, 64 and 120 frames of 512x512 in one pass. The record: 5 layers at each
# of the 3 levels (N x 320, N/4 x 640, N/16 x 1280) and the middle (N/64 x 1280).
SD1 = Profile("SD1.x/SD2.x", 110 * 2**20, 38_900, 11_500, 12_500, 2 * 320 * 4,
              5 * 320 + 5 * 640 // 4 + 5 * 1280 // 16 + 1280 // 64, beyond=20_500)
# SDXL: ``active``, ``beyond`` and ``held`` fitted at 2 and 4 frames of 1024x1024, in one pass and
# in passes of 2 (bench_long_clips --model sdxl); ``edit_active`` measured (benchmarks/bench_sdxl.py);
# ``held_qkv`` is ``held`` plus q, k, v at its first attention level (N/4 x 640), not measured.
SDXL = Profile("SDXL", 110 * 2**20, 29_000, 4_000, 6_000, 2 * 640 // 4 * 4, 10 * 640 // 4 + 60 * 1280 // 16,
               edit_active=89_900, beyond=9_000)
PROFILES = {p.name: p for p in (SD1, SDXL)}
# what a plan may take of the memory that is free: the rest is headroom for the host
DEFAULT_SHARE = 0.8


@dataclass(frozen=True)
class CallShape:
    """What the memory of one UNet call over a clip depends on."""

    frames: int  # frames of each cond chunk in the call
    tokens: int  # first-level tokens a frame (latent height x width)
    rows_per_frame: int = 1  # cond chunks a call: 2 with CFG, 1 without, 3 in TokenFlow
    element_size: int = 4  # bytes an activation value
    profile: Profile = SD1
    inflated: bool = False  # the passes gather every frame's keys and values (inflated attention)


@dataclass(frozen=True)
class PassPlan:
    frames: int  # frames of each cond chunk in the call
    frames_per_pass: int
    rows_per_frame: int
    estimated_bytes: int

    @property
    def passes(self) -> int:
        return -(-self.frames // self.frames_per_pass)


def call_bytes(call: CallShape, frames_per_pass: int, holds_qkv: bool = False, edit: bool = False) -> int:
    """Peak bytes above the loaded model of the UNet call ``call`` run in passes of
    ``frames_per_pass``; ``holds_qkv``: the passes wait in the attention (TokenFlow's keyframes),
    not before the projections; ``edit``: a TokenFlow pass (``profile.edit_active`` a row where
    the profile has one)."""
    p, frames, rows = call.profile, call.frames, call.rows_per_frame
    n = max(1, min(int(frames_per_pass), int(frames)))
    computing = call.tokens * n * rows
    first = (p.edit_active or p.active) if edit else p.active
    active = first * min(computing, CHUNK_TOKENS) + (p.beyond or first) * max(0, computing - CHUNK_TOKENS)
    held = (p.held_qkv if holds_qkv else p.held) * call.tokens * (frames - n) * rows
    gathered = p.gathered * call.tokens * frames * rows if call.inflated and n < frames else 0
    return int(p.fixed + (active + held + gathered) * call.element_size / 4)


def plan_passes(call: CallShape, free_bytes: int | None, frames_per_pass: int = 0,
                share: float = DEFAULT_SHARE) -> tuple[PassPlan, bool]:
    """The pass size to run ``call`` with, its estimate, and whether that fits ``share`` of
    ``free_bytes`` (None: unknown, anything fits). ``frames_per_pass`` 0 picks the largest
    that fits (one pass when the clip fits; one frame a pass, not fitting, when none does);
    a given one is kept."""
    if call.frames < 1:
        raise ValueError(f"need at least one frame, got {call.frames}")
    return _search(call.frames, frames_per_pass, free_bytes, share,
                   lambda n: PassPlan(call.frames, n, call.rows_per_frame, call_bytes(call, n)))


def _search(total: int, requested: int, free_bytes: int | None, share: float, plan) -> tuple[PassPlan, bool]:
    """``plan(n)`` for the requested ``n`` (kept, and judged), or with 0 for the largest ``n``
    that fits ``share`` of ``free_bytes`` (``plan(1)``, not fitting, when none does)."""
    limit = None if free_bytes is None else share * free_bytes
    if requested > 0:
        p = plan(min(total, int(requested)))
        return p, limit is None or p.estimated_bytes <= limit
    for n in range(total, 0, -1):
        p = plan(n)
        if limit is None or p.estimated_bytes <= limit:
            return p, True
    return plan(1), False


def tokenflow_step_bytes(keyframes: CallShape, batch_size: int, keyframes_per_pass: int) -> int:
    """Peak bytes above the loaded model of a TokenFlow edit step: the larger of the keyframe
    pass (``keyframes``: one keyframe per batch, each in ``rows_per_frame`` branches, 3 or 2
    without CFG; in passes of ``keyframes_per_pass`` that gather the edit branches' keys and
    values) and a propagation pass (``batch_size`` frames), plus the keyframe record the
    propagation passes read."""
    keyframe_pass = call_bytes(replace(keyframes, inflated=True), keyframes_per_pass, holds_qkv=True, edit=True)
    propagation = call_bytes(replace(keyframes, frames=batch_size, inflated=False), batch_size, edit=True)
    record = keyframes.profile.record_bytes * keyframes.tokens * keyframes.frames * keyframes.element_size // 4
    return max(keyframe_pass, propagation) + record


def plan_tokenflow(keyframes: CallShape, batch_size: int, free_bytes: int | None, keyframes_per_pass: int = 0,
                   share: float = DEFAULT_SHARE) -> tuple[PassPlan, bool]:
    """:func:`plan_passes` for a TokenFlow edit: keyframes a pass (0 = the most that fit)."""
    if keyframes.frames < 1:
        raise ValueError(f"need at least one keyframe, got {keyframes.frames}")
    return _search(keyframes.frames, keyframes_per_pass, free_bytes, share, lambda n: PassPlan(
        keyframes.frames, n, keyframes.rows_per_frame, tokenflow_step_bytes(keyframes, batch_size, n)))


# FateZero's explicit cross-attention probabilities are made this much at a time (source, target,
# controlled), docs/FATEZERO.md §8
PROBABILITY_BLOCK_BYTES = 64 * 2**20


def fatezero_step_bytes(clip: CallShape, frames_per_pass: int) -> int:
    """Peak bytes above the loaded model of a FateZero edit step over ``clip.frames`` frames in
    ``clip.rows_per_frame`` branches (3: source, target, negative; 2 without CFG), each branch
    in passes of ``frames_per_pass`` frames that wait in the attention while one computes."""
    branches = replace(clip, frames=clip.frames * clip.rows_per_frame, rows_per_frame=1)
    return call_bytes(branches, frames_per_pass, holds_qkv=True) + 3 * PROBABILITY_BLOCK_BYTES


def plan_fatezero(clip: CallShape, free_bytes: int | None, frames_per_pass: int = 0,
                  share: float = DEFAULT_SHARE) -> tuple[PassPlan, bool]:
    """:func:`plan_passes` for a FateZero edit: frames a pass of each branch (0 = the most that fit)."""
    if clip.frames < 1:
        raise ValueError(f"need at least one frame, got {clip.frames}")
    return _search(clip.frames, frames_per_pass, free_bytes, share,
                   lambda n: PassPlan(clip.frames, n, clip.rows_per_frame, fatezero_step_bytes(clip, n)))

