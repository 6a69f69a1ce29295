"""Self-attention variants on q, k, v as ComfyUI hands them to an attn1 replacement.

Every function takes ``q, k, v`` of shape ``[B, N, heads*d]`` (B frames of N tokens, heads
concatenated on the channel axis) and returns ``[B, N, heads*d]``, ready for the layer's
output projection. The batch is ``num_chunks`` equal chunks of consecutive frames, one
per cond/uncond branch (ComfyUI never splits one cond's frames across a chunk).

- :func:`full_attention`: every frame's queries attend to the keys/values of every frame of
  its group. This is TokenFlow's extended keyframe attention (REFERENCE §5.3) and the
  "inflated" attention of the STEM paper.
- :func:`stem_attention`: every frame's queries attend to the EM bases of its group
  (REFERENCE §4).
- :func:`sparse_causal_attention`: FateZero's spatial-temporal attention, every frame's queries
  attending to the tokens of the previous and the first frame of its chunk.
- :func:`stem_attention_passes` / :func:`full_attention_passes`: the same over one group per
  chunk whose frames come in several passes (a clip too long for one UNet call): the bases
  (:func:`stem_bases`), or the keys and values attended to (:func:`gathered_keys_values`), span
  the frames of every pass, each pass's queries attend to them (:func:`attend_shared`), and the
  result equals the one-pass result bit for bit (one pass is the case of a single pass).

``precision`` (a dtype or None) is the layer's attention precision: the model config's
``attn_precision`` (SD2.x asks for fp32). When it is wider than ``q``'s dtype the attention
runs in it and the output is cast back, as ComfyUI's own attention functions do.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange

from .em import EMParams, em_bases


def frame_groups(num_frames: int, frames_per_group: int | None = None) -> list[tuple[int, int]]:
    """Consecutive groups ``(start, length)`` of one chunk's frames.

    None means one group of all frames (the paper's whole-clip bases, our default); n gives
    groups of n frames with a shorter last group, as the reference's inversion batches do
    (REFERENCE §3: 60 frames in batches of 8 leave a last group of 4).
    """
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    n = num_frames if not frames_per_group or frames_per_group >= num_frames else int(frames_per_group)
    return [(s, min(n, num_frames - s)) for s in range(0, num_frames, n)]


def _grouped(
    num_frames_total: int, num_chunks: int, frames_per_group: int | None
) -> Iterator[tuple[int, int, int]]:
    """Yield ``(start_in_chunk, group_len, count)`` blocks: all groups of one length across
    all chunks are processed in one batched call (at most two calls: full and short groups)."""
    if num_chunks < 1 or num_frames_total % num_chunks:
        raise ValueError(f"batch of {num_frames_total} frames does not split into {num_chunks} equal chunks")
    groups = frame_groups(num_frames_total // num_chunks, frames_per_group)
    full = [g for g in groups if g[1] == groups[0][1]]
    yield 0, groups[0][1], len(full)
    if len(full) < len(groups):
        start, length = groups[-1]
        yield start, length, 1


def _apply_grouped(
    fn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    num_chunks: int,
    frames_per_group: int | None,
) -> torch.Tensor:
    """Run ``fn(qg, kg, vg)`` on ``[groups, heads, frames*N, d]`` views of each block of
    equal-size groups and scatter the results back to ``[B, N, heads*d]``."""
    B, N, _ = q.shape
    blocks = list(_grouped(B, num_chunks, frames_per_group))
    out = torch.empty_like(q)
    out_chunks = rearrange(out, "(c f) n e -> c f n e", c=num_chunks)
    for start, length, count in blocks:
        span = slice(start, start + length * count)

        def to_groups(x: torch.Tensor) -> torch.Tensor:
            x = rearrange(x, "(c f) n e -> c f n e", c=num_chunks)[:, span]
            return rearrange(x, "c (g f) n (h d) -> (c g) h (f n) d", f=length, h=heads)

        o = fn(to_groups(q), to_groups(k), to_groups(v))
        out_chunks[:, span] = rearrange(o, "(c g) h (f n) d -> c (g f) n (h d)", c=num_chunks, f=length, n=N)
    return out


def _upcast(fn, precision: torch.dtype | None):
    """``fn(q, k, v)`` computed in ``precision`` (when given and different), output in q's dtype."""
    if precision is None:
        return fn

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dtype == precision:
            return fn(q, k, v)
        return fn(q.to(precision), k.to(precision), v.to(precision)).to(q.dtype)

    return run


def _clip_view(x: torch.Tensor, num_chunks: int, heads: int) -> torch.Tensor:
    """``[(c f), N, (h d)]`` as ``[c, h, (f N), d]``: each chunk's frames as one token axis per
    head. A view (merging f and N needs no copy)."""
    B, N, E = x.shape
    if num_chunks < 1 or B % num_chunks:
        raise ValueError(f"batch of {B} frames does not split into {num_chunks} equal chunks")
    f = B // num_chunks
    return x.view(num_chunks, f, N, heads, E // heads).permute(0, 3, 1, 2, 4).reshape(num_chunks, heads, f * N, E // heads)


def _from_clip_view(o: torch.Tensor, tokens: int) -> torch.Tensor:
    """Inverse of :func:`_clip_view`: ``[c, h, (f N), d]`` to ``[(c f), N, (h d)]``."""
    c, h, T, d = o.shape
    return o.reshape(c, h, T // tokens, tokens, d).permute(0, 2, 3, 1, 4).reshape(c * (T // tokens), tokens, h * d)


def _whole_group(q: torch.Tensor, num_chunks: int, frames_per_group: int | None) -> bool:
    return not frames_per_group or frames_per_group >= q.shape[0] // max(1, num_chunks)


def gathered_keys_values(
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    heads: int,
    num_chunks: int = 1,
    precision: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of every frame of each chunk, from the passes' ``[num_chunks * F_p,
    N, heads*d]`` tensors (chunk c's frames of pass p in rows ``c*F_p .. (c+1)*F_p - 1``), as
    ``[c, h, T, d]`` for :func:`attend_shared`: what inflated attention attends to. A pass's
    values may be a function that makes them."""
    work = precision or ks[0].dtype
    keys = torch.cat([_clip_view(k, num_chunks, heads).to(work) for k in ks], dim=2)
    values = torch.cat([_clip_view(v() if callable(v) else v, num_chunks, heads).to(work) for v in vs], dim=2)
    return keys, values


def stem_bases(
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    heads: int,
    num_chunks: int = 1,
    em: EMParams = EMParams(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The EM key and value bases ``[c, h, M, d]`` (fp32) of each chunk's frames over all passes
    (``ks``, ``vs`` as in :func:`gathered_keys_values`): EM runs once per chunk and head over
    the keys of all passes, as token blocks that are never concatenated (REFERENCE §4). A pass's
    values may be a function that makes them: it is called once, for EM's last iteration, and
    only one pass's values are alive at a time."""
    key_blocks = [_clip_view(k, num_chunks, heads) for k in ks]

    def view(v):
        return (lambda: _clip_view(v(), num_chunks, heads)) if callable(v) else _clip_view(v, num_chunks, heads)

    value_blocks = [view(v) for v in vs]
    return em_bases(key_blocks, value_blocks, em)


def attend_shared(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int, num_chunks: int = 1,
    precision: torch.dtype | None = None,
) -> torch.Tensor:
    """One pass's queries ``[num_chunks * F_p, N, heads*d]`` against its chunk's shared
    ``keys`` / ``values`` ``[c, h, T, d]`` (bases, or every frame's tokens)."""
    work = precision or q.dtype
    qg = _clip_view(q, num_chunks, heads).to(work).contiguous()
    o = F.scaled_dot_product_attention(qg, keys.to(work), values.to(work))
    return _from_clip_view(o, q.shape[1]).to(q.dtype)


def full_attention_passes(
    qs: list[torch.Tensor],
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    heads: int,
    num_chunks: int = 1,
    precision: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Extended attention of each chunk's frames over the frames of all passes: each pass's
    queries attend to the keys and values of every frame of their chunk. One output per pass."""
    keys, values = gathered_keys_values(ks, vs, heads, num_chunks, precision)
    return [attend_shared(q, keys, values, heads, num_chunks, precision) for q in qs]


def stem_attention_passes(
    qs: list[torch.Tensor],
    ks: list[torch.Tensor],
    vs: list[torch.Tensor],
    heads: int,
    num_chunks: int = 1,
    em: EMParams = EMParams(),
    precision: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """STEM attention (REFERENCE §4) of each chunk's frames, spread over several passes:
    :func:`stem_bases` over all of them, then each pass's queries attend to the bases.
    One output per pass."""
    mu, v_bases = stem_bases(ks, vs, heads, num_chunks, em)
    return [attend_shared(q, mu, v_bases, heads, num_chunks, precision) for q in qs]


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    num_chunks: int = 1,
    frames_per_group: int | None = None,
    precision: torch.dtype | None = None,
) -> torch.Tensor:
    """Extended (inflated) attention: each frame's queries attend to all ``F*N`` tokens of
    its group. With one group per chunk this is TokenFlow's keyframe attention
    (REFERENCE §5.3). Memory grows with ``(F*N)^2`` unless SDPA picks a fused kernel."""
    if _whole_group(q, num_chunks, frames_per_group):
        return full_attention_passes([q], [k], [v], heads, num_chunks, precision)[0]
    attend = _upcast(F.scaled_dot_product_attention, precision)
    return _apply_grouped(attend, q, k, v, heads, num_chunks, frames_per_group)


def full_attention_bytes(
    frames_per_group: int, tokens: int, channels: int, heads: int, num_groups: int = 1,
    element_size: int = 4, fused: bool = True,
) -> int:
    """Extra memory of :func:`full_attention` for one layer: the grouped copies of q, k, v and
    the output (``4 * groups * F*N * C`` elements), plus the ``[groups, heads, F*N, F*N]``
    attention weights when SDPA has no fused (flash / memory-efficient) kernel to use."""
    T = frames_per_group * tokens
    total = 4 * num_groups * T * channels
    if not fused:
        total += num_groups * heads * T * T
    return total * element_size


def stem_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    num_chunks: int = 1,
    frames_per_group: int | None = None,
    em: EMParams = EMParams(),
    precision: torch.dtype | None = None,
) -> torch.Tensor:
    """STEM self-attention (REFERENCE §4).

    For each group (by default every frame of one chunk), EM estimates ``em.num_bases`` key
    bases and value bases per head from the group's keys and values, and every frame's
    queries attend to them with ``scaled_dot_product_attention`` (scale ``1/sqrt(d)``).
    The bases are fp32; the attention runs in the dtype of ``q`` (or ``precision``).
    """

    if _whole_group(q, num_chunks, frames_per_group):
        return stem_attention_passes([q], [k], [v], heads, num_chunks, em, precision)[0]

    def attend(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor) -> torch.Tensor:
        mu, v_bases = em_bases(kg, vg, em)
        return F.scaled_dot_product_attention(qg, mu.to(qg.dtype), v_bases.to(qg.dtype))

    return _apply_grouped(_upcast(attend, precision), q, k, v, heads, num_chunks, frames_per_group)


# FateZero's SparseCausalAttention_index default (docs/FATEZERO.md §3): the previous frame (clamped
# to the clip), then the first.
SPARSE_CAUSAL_FRAMES = (-1, "first")


def sparse_causal_frames(num_frames: int, index=SPARSE_CAUSAL_FRAMES) -> list[list[int]]:
    """For each entry of ``index``, the frame every frame attends to: an int is an offset clamped to
    the clip, 'first', 'last' and 'mid' are frames 0, F-1 and (F-1)//2 (FateZero's rule)."""
    named = {"first": 0, "last": num_frames - 1, "mid": (num_frames - 1) // 2}
    out = []
    for entry in index:
        if isinstance(entry, str):
            out.append([named[entry]] * num_frames)
        else:
            out.append([min(max(f + int(entry), 0), num_frames - 1) for f in range(num_frames)])
    return out


def sparse_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    num_chunks: int = 1,
    precision: torch.dtype | None = None,
    index=SPARSE_CAUSAL_FRAMES,
) -> torch.Tensor:
    """FateZero's spatial-temporal self-attention (docs/FATEZERO.md §3): frame f of each chunk attends
    to the tokens of the frames :func:`sparse_causal_frames` gives, concatenated in that order
    (by default its previous frame, then the first; frame 0 attends to itself twice, which is
    attention to itself). Memory: keys and values of ``len(index)`` frames per frame."""
    B, N, E = q.shape
    if num_chunks < 1 or B % num_chunks:
        raise ValueError(f"batch of {B} frames does not split into {num_chunks} equal chunks")
    frames = sparse_causal_frames(B // num_chunks, index)

    def gathered(x: torch.Tensor) -> torch.Tensor:
        chunks = x.view(num_chunks, B // num_chunks, N, E)
        g = torch.cat([chunks[:, f] for f in frames], dim=2)  # [c, F, len(index) * N, E]
        return g.reshape(B, len(frames) * N, heads, E // heads).transpose(1, 2)

    qh = q.view(B, N, heads, E // heads).transpose(1, 2)
    out = _upcast(F.scaled_dot_product_attention, precision)(qh, gathered(k), gathered(v))
    return out.transpose(1, 2).reshape(B, N, E)

