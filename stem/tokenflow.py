"""TokenFlow propagation: keyframes, nearest-neighbour fields and the blend of two keyframes.

REFERENCE.md §5, steps 3 and 4 (cited below as §5.3 and §5.4). Each step of the edit samples
one keyframe per batch of ``batch_size`` consecutive frames; a keyframe pass records, in every
transformer block, the source branch's ``norm1(x)`` and the self-attention output of each
keyframe. The propagation pass then replaces the self-attention of every frame by the recorded
keyframe output taken at each token's nearest neighbour (cosine similarity of the source
``norm1(x)``), blending the keyframes of batch b and b-1.

Notation: F frames in a batch, N tokens per frame, C channels, K keyframes, G branches
(3 in the reference: source, unconditional, conditional). Everything here is plain torch. The
host adapter's attention hooks call, in every transformer block:
- keyframe pass: :func:`keyframe_attention` for each edit branch (:func:`keyframe_attention_passes`
  when the keyframes come in several passes);
- propagation pass: :func:`batch_fields` on the source branch's ``norm1(x)``, then
  :func:`propagate_outputs` in place of the self-attention of every branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_nn
from torch import Tensor

from .attention import full_attention_passes

__all__ = [
    "DEFAULT_SIM_BLOCK_ELEMENTS",
    "sample_keyframes",
    "batch_ranges",
    "nn_chunk_rows",
    "nearest_neighbour_field",
    "propagation_weights",
    "propagate",
    "keyframe_attention",
    "keyframe_attention_passes",
    "NNFields",
    "batch_fields",
    "propagate_outputs",
]

# Largest similarity block held at once: 2**24 fp32 values = 64 MiB. For N = 4096 keyframe
# tokens that is 4096 query rows per block, so a 120 x 4096 x 4096 field (8 GiB if built
# whole) needs about 64 MiB for the block plus a few MiB of normalised rows.
DEFAULT_SIM_BLOCK_ELEMENTS = 2**24


def _check_batching(num_frames: int, batch_size: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def batch_ranges(num_frames: int, batch_size: int) -> list[range]:
    """Frames of each batch: ``range(b*bs, min((b+1)*bs, F))`` for b = 0 .. ceil(F/bs)-1.

    The reference cuts F down to a multiple of ``batch_size`` (REFERENCE §5); here a shorter
    last batch is kept so the whole clip is edited.
    """
    _check_batching(num_frames, batch_size)
    return [range(s, min(s + batch_size, num_frames)) for s in range(0, num_frames, batch_size)]


def sample_keyframes(
    num_frames: int, batch_size: int, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """One random keyframe in each batch of ``batch_size`` consecutive frames (REFERENCE §5.3).

    Returns ``[n_batches]`` absolute frame indices, ``n_batches = ceil(F / bs)``.

    For the full batches this is the reference's draw,
    ``torch.randint(bs, (F // bs,)) + torch.arange(0, F, bs)``, so with the same generator state
    (or the same global RNG state when ``generator`` is None) it gives the reference's keyframes.
    A short last batch of ``L < bs`` frames, which the reference never has, draws its offset with a
    second ``torch.randint(L, (1,))`` after that, so it stays uniform inside its own group.
    """
    _check_batching(num_frames, batch_size)
    n_full, rest = divmod(num_frames, batch_size)
    offsets = torch.randint(batch_size, (n_full,), generator=generator)
    if rest:
        last = torch.randint(rest, (1,), generator=generator)
        offsets = torch.cat([offsets, last])
    starts = torch.arange(0, num_frames, batch_size)
    return offsets + starts


def nn_chunk_rows(num_keyframe_tokens: int, chunk_size: int | None = None) -> int:
    """Query rows per similarity block: ``chunk_size``, or by default as many rows as fit
    ``DEFAULT_SIM_BLOCK_ELEMENTS`` (a block of ``rows x num_keyframe_tokens`` fp32 values)."""
    if chunk_size is None:
        return max(1, DEFAULT_SIM_BLOCK_ELEMENTS // max(1, num_keyframe_tokens))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


@torch.no_grad()
def nearest_neighbour_field(
    frames: Tensor, keyframe: Tensor, chunk_size: int | None = None
) -> torch.LongTensor:
    """Index of each frame token's most cosine-similar keyframe token (REFERENCE §5.4).

    Args:
        frames: ``[F, N, C]`` source-branch ``norm1(x)`` of the frames (any float dtype).
        keyframe: ``[M, C]`` source-branch ``norm1(x)`` of one keyframe (M = N in practice).
        chunk_size: query rows (tokens, counted across frames) per similarity block; None picks
            :func:`nn_chunk_rows`'s default, so extra memory is about ``rows * M * 4`` bytes
            instead of the ``F * N * M * 4`` of the reference's single matmul.

    Returns:
        ``[F, N]`` long indices into the M keyframe tokens.

    The similarity is the reference's ``batch_cosine_sim`` (L2-normalise both sides, then
    ``x @ y.T``), computed in fp32 even for fp16/bf16 inputs. Every block does the same per-row
    math, so the indices do not depend on ``chunk_size`` (tested bit-exact on CPU; a GPU BLAS that
    picks its kernel by block height could differ in the last bit, which only matters at exact
    ties). ``F.normalize``'s eps keeps an all-zero token finite (the reference divides by zero).
    """
    if frames.ndim != 3 or keyframe.ndim != 2 or frames.shape[-1] != keyframe.shape[-1]:
        raise ValueError(
            f"expected frames [F, N, C] and keyframe [M, C], got {tuple(frames.shape)} "
            f"and {tuple(keyframe.shape)}"
        )
    n_frames, n_tokens, _ = frames.shape
    queries = frames.reshape(n_frames * n_tokens, -1)
    keys = F_nn.normalize(keyframe.to(torch.float32), dim=-1)  # [M, C]
    keys_t = keys.t()  # [C, M]
    rows = nn_chunk_rows(keys.shape[0], chunk_size)
    total = queries.shape[0]

    result = torch.empty(total, dtype=torch.long, device=frames.device)
    # One reused block avoids reallocating (and re-faulting) rows*M floats per chunk.
    block = torch.empty(min(rows, total), keys.shape[0], dtype=torch.float32, device=frames.device)
    for start in range(0, total, rows):
        stop = min(start + rows, total)
        q = F_nn.normalize(queries[start:stop].to(torch.float32), dim=-1)  # [r, C]
        sim = block[: stop - start]
        torch.mm(q, keys_t, out=sim)  # [r, M]
        torch.argmax(sim, dim=-1, out=result[start:stop])
    return result.view(n_frames, n_tokens)


def propagation_weights(
    frame_indices: Tensor,
    batch_index: int,
    batch_size: int,
    keyframes: Tensor | None = None,
    use_true_keyframe_positions: bool = False,
) -> Tensor:
    """Weight of keyframe b against keyframe b-1 for each frame of batch b (REFERENCE §5.4).

    Args:
        frame_indices: ``[F]`` absolute indices of the frames being propagated.
        batch_index: b. For b = 0 there is no previous keyframe and the weights are all ones.
        batch_size: the nominal batch size bs (also for a short last batch).
        keyframes: ``[K]`` absolute keyframe indices; needed only with
            ``use_true_keyframe_positions``.
        use_true_keyframe_positions: measure distances to the sampled keyframes
            ``keyframes[b]`` and ``keyframes[b-1]`` instead of the batch midpoints.

    Returns:
        ``[F]`` fp32 weights ``w = sigmoid(d2 / (d1 + d2))``, d1 and d2 being each frame's distance
        to keyframe b and b-1. ``d1 + d2 >= |p1 - p2| >= 1`` because the two keyframes lie in
        different batches, so the ratio is always defined.
    """
    if batch_index < 0:
        raise ValueError(f"batch_index must be >= 0, got {batch_index}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    s = frame_indices.to(torch.long)
    if batch_index == 0:
        return torch.ones(s.shape, dtype=torch.float32, device=s.device)
    if use_true_keyframe_positions:
        if keyframes is None or keyframes.numel() <= batch_index:
            raise ValueError("use_true_keyframe_positions needs keyframes for batches b and b-1")
        p1, p2 = int(keyframes[batch_index]), int(keyframes[batch_index - 1])
    else:
        # Quirk (REFERENCE §5.4): keyframe assumed mid-batch, not at its sampled index. A short
        # last batch still uses the nominal bs // 2, so its midpoint may lie past the clip's end.
        p1 = batch_index * batch_size + batch_size // 2
        p2 = (batch_index - 1) * batch_size + batch_size // 2
    d1 = (s - p1).abs()
    d2 = (s - p2).abs()
    # Quirk (REFERENCE §5.4): sigmoid of a ratio in [0.5, 1] squeezes w into [0.62, 0.73].
    return torch.sigmoid(d2.to(torch.float32) / (d1 + d2).to(torch.float32))


def propagate(
    kf_out: Tensor,
    idx: Tensor,
    kf_out_prev: Tensor | None = None,
    idx_prev: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Gather each frame token's keyframe self-attention output and blend two keyframes.

    Args:
        kf_out: ``[G, M, C]`` recorded self-attention output of keyframe b, one row per branch.
        idx: ``[F, N]`` nearest-neighbour indices into keyframe b's M tokens; the same indices
            serve every branch (REFERENCE §5.4).
        kf_out_prev: ``[G, M, C]`` output of keyframe b-1, or None for batch 0 (no blend).
        idx_prev: ``[F, N]`` indices into keyframe b-1; required with ``kf_out_prev``.
        weights: ``[F]`` weight w of keyframe b; required with ``kf_out_prev``.

    Returns:
        ``[G, F, N, C]`` in ``kf_out``'s dtype: ``out_b`` for batch 0, else
        ``w*out_b + (1-w)*out_{b-1}``, computed in fp32 as ``lerp(out_{b-1}, out_b, w)`` so that
        two equal keyframe outputs come back unchanged.
    """
    if idx.ndim != 2:
        raise ValueError(f"idx must be [F, N], got {tuple(idx.shape)}")
    out_b = kf_out[:, idx]  # [G, F, N, C]
    if kf_out_prev is None:
        return out_b
    if idx_prev is None or weights is None:
        raise ValueError("blending with kf_out_prev needs idx_prev and weights")
    if kf_out_prev.shape[0] != kf_out.shape[0] or idx_prev.shape != idx.shape:
        raise ValueError("kf_out_prev / idx_prev do not match kf_out / idx")
    if weights.shape != idx.shape[:1]:
        raise ValueError(f"weights must be [F] = {tuple(idx.shape[:1])}, "
                         f"got {tuple(weights.shape)}")
    out_prev = kf_out_prev[:, idx_prev]
    work = torch.promote_types(kf_out.dtype, torch.float32)
    w = weights.to(device=out_b.device, dtype=work)[None, :, None, None]
    blended = torch.lerp(out_prev.to(work), out_b.to(work), w)
    return blended.to(kf_out.dtype)


def keyframe_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    source_qk: tuple[Tensor, Tensor] | None = None,
    precision: torch.dtype | None = None,
) -> Tensor:
    """Self-attention of one edit branch in the keyframe pass (REFERENCE §5.2-5.3).

    Args:
        q, k, v: ``[K, N, heads*d]`` of the branch's K keyframes.
        heads: attention heads.
        source_qk: the source branch's ``(q, k)`` of the same keyframes during the PnP window:
            they replace the branch's queries and keys; its values are kept.
        precision: the layer's attention precision (see :mod:`stem.attention`).

    Returns:
        ``[K, N, heads*d]``: every keyframe's queries attend to the tokens of all K keyframes
        (extended attention). The source branch itself keeps per-frame attention.
    """
    return keyframe_attention_passes([q], [k], [v], heads, [source_qk], precision)[0]


def keyframe_attention_passes(
    qs: list[Tensor],
    ks: list[Tensor],
    vs: list[Tensor],
    heads: int,
    source_qks: list[tuple[Tensor, Tensor] | None],
    precision: torch.dtype | None = None,
) -> list[Tensor]:
    """:func:`keyframe_attention` of one edit branch whose keyframes come in several passes
    (``[K_p, N, heads*d]`` each, with the source's q/k of the same keyframes in the PnP window):
    every pass's queries attend to the tokens of the keyframes of all passes. One output per
    pass; one pass is :func:`keyframe_attention`."""
    subs = []
    for q, k, sqk in zip(qs, ks, source_qks):
        if sqk is not None:
            sq, sk = sqk
            if sq.shape != q.shape or sk.shape != k.shape:
                raise ValueError(f"source q/k {tuple(sq.shape)} do not match the branch's {tuple(q.shape)}")
            q, k = sq.to(q.dtype), sk.to(k.dtype)
        subs.append((q, k))
    return full_attention_passes([q for q, _ in subs], [k for _, k in subs], vs, heads, 1, precision)


@dataclass(frozen=True)
class NNFields:
    """Nearest-neighbour fields of one propagation batch (REFERENCE §5.4).

    ``idx``: ``[F, N]`` indices into keyframe b's tokens; ``idx_prev`` / ``weights``: the same
    into keyframe b-1 and the ``[F]`` weight of keyframe b, both None for batch 0.
    """

    batch_index: int
    idx: Tensor
    idx_prev: Tensor | None = None
    weights: Tensor | None = None


@torch.no_grad()
def batch_fields(
    batch_source: Tensor,
    keyframe_source: Tensor,
    batch_index: int,
    batch_size: int,
    keyframes: Tensor | None = None,
    use_true_keyframe_positions: bool = False,
    chunk_size: int | None = None,
) -> NNFields:
    """The fields of batch b in one transformer block, from the SOURCE branch (REFERENCE §5.4).

    Args:
        batch_source: ``[F, N, C]`` source-branch ``norm1(x)`` of the batch's frames,
            frames ``b*bs .. b*bs+F-1`` (F <= bs; F < bs only for a short last batch).
        keyframe_source: ``[K, N, C]`` source-branch ``norm1(x)`` recorded for all keyframes.
        batch_index: b.
        batch_size: the nominal batch size bs.
        keyframes: ``[K]`` absolute keyframe indices (only used with
            ``use_true_keyframe_positions``).
        use_true_keyframe_positions: see :func:`propagation_weights`.
        chunk_size: see :func:`nearest_neighbour_field`.
    """
    if batch_source.ndim != 3 or keyframe_source.ndim != 3:
        raise ValueError("expected batch_source [F, N, C] and keyframe_source [K, N, C]")
    n_kf = keyframe_source.shape[0]
    if not 0 <= batch_index < n_kf:
        raise ValueError(f"batch_index {batch_index} outside the {n_kf} keyframes")
    if batch_source.shape[0] > batch_size:
        raise ValueError(f"batch of {batch_source.shape[0]} frames exceeds batch_size {batch_size}")

    idx = nearest_neighbour_field(batch_source, keyframe_source[batch_index], chunk_size)
    if batch_index == 0:
        return NNFields(0, idx)
    idx_prev = nearest_neighbour_field(batch_source, keyframe_source[batch_index - 1], chunk_size)
    frame_indices = batch_index * batch_size + torch.arange(batch_source.shape[0], device=batch_source.device)
    weights = propagation_weights(frame_indices, batch_index, batch_size, keyframes, use_true_keyframe_positions)
    return NNFields(batch_index, idx, idx_prev, weights)


@torch.no_grad()
def propagate_outputs(outputs_b: Tensor, fields: NNFields, outputs_prev: Tensor | None = None) -> Tensor:
    """The propagated self-attention of batch b in one transformer block (REFERENCE §5.4).

    Args:
        outputs_b: ``[G, M, C]`` recorded self-attention output of keyframe b, one row per
            branch; the same fields serve every branch.
        fields: :func:`batch_fields` of the batch.
        outputs_prev: ``[G, M, C]`` the same for keyframe b-1; required for b > 0.

    Returns:
        ``[G, F, N, C]`` in ``outputs_b``'s dtype.
    """
    if outputs_b.ndim != 3:
        raise ValueError(f"outputs_b must be [G, M, C], got {tuple(outputs_b.shape)}")
    if fields.batch_index == 0:
        return propagate(outputs_b, fields.idx)
    if outputs_prev is None:
        raise ValueError(f"batch {fields.batch_index} blends keyframes b and b-1: outputs_prev is required")
    return propagate(outputs_b, fields.idx, outputs_prev, fields.idx_prev, fields.weights)
