"""Attention variants on ComfyUI's attn1 layout [B, N, heads*d], against naive formulas."""
import math

import pytest
import torch

from stem.attention import frame_groups, full_attention, stem_attention
from stem.em import EMParams, em_bases


def qkv(B=6, N=10, heads=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, heads * d, generator=g) for _ in range(3)]


def naive_attention(q, k, v):
    """q [Nq, d], k/v [Nk, d]."""
    w = torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def head(x, h, d):
    return x[..., h * d : (h + 1) * d]


def test_frame_groups_whole_clip_and_reference_chunks():
    assert frame_groups(60) == [(0, 60)]
    assert frame_groups(60, 8)[-1] == (56, 4) and len(frame_groups(60, 8)) == 8
    assert frame_groups(16, 8) == [(0, 8), (8, 8)]
    assert frame_groups(5, 8) == [(0, 5)]
    with pytest.raises(ValueError):
        frame_groups(0)


@pytest.mark.parametrize("num_chunks,frames_per_group", [(1, None), (2, None), (2, 2), (1, 4)])
def test_full_attention_matches_naive_over_group_tokens(num_chunks, frames_per_group):
    q, k, v = qkv(B=6)
    out = full_attention(q, k, v, heads=2, num_chunks=num_chunks, frames_per_group=frames_per_group)
    F = 6 // num_chunks
    for c in range(num_chunks):
        for start, length in frame_groups(F, frames_per_group):
            frames = range(c * F + start, c * F + start + length)
            for h in range(2):
                keys = torch.cat([head(k[f], h, 4) for f in frames])
                vals = torch.cat([head(v[f], h, 4) for f in frames])
                for f in frames:
                    ref = naive_attention(head(q[f], h, 4), keys, vals)
                    torch.testing.assert_close(head(out[f], h, 4), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_chunks,frames_per_group", [(1, None), (2, None), (2, 2), (1, 4)])
def test_stem_attention_matches_per_group_em_then_attention(num_chunks, frames_per_group):
    q, k, v = qkv(B=6, N=12, heads=2, d=4, seed=1)
    M = 5
    out = stem_attention(q, k, v, 2, num_chunks, frames_per_group, EMParams(M).seeded(3))
    # redo it group by group and head by head, drawing the initial noise in the same order
    gen = torch.Generator().manual_seed(3)
    F = 6 // num_chunks
    groups = frame_groups(F, frames_per_group)
    blocks = [[g for g in groups if g[1] == groups[0][1]]]
    if len(blocks[0]) < len(groups):
        blocks.append([groups[-1]])
    for block in blocks:
        length = block[0][1]
        # stem_attention draws noise for all (chunk, group, head) of a block at once
        noise = torch.randn(num_chunks * len(block), 2, M, 4, generator=gen)
        for c in range(num_chunks):
            for gi, (start, _) in enumerate(block):
                frames = range(c * F + start, c * F + start + length)
                for h in range(2):
                    keys = torch.cat([head(k[f], h, 4) for f in frames])
                    vals = torch.cat([head(v[f], h, 4) for f in frames])
                    init = keys.mean(0) + keys.std(0) * noise[c * len(block) + gi, h]
                    mu, vb = em_bases(keys, vals, EMParams(M), init=init)
                    for f in frames:
                        ref = naive_attention(head(q[f], h, 4), mu, vb)
                        torch.testing.assert_close(head(out[f], h, 4), ref, rtol=1e-4, atol=1e-4)


def test_whole_clip_bases_are_shared_by_every_frame_of_a_chunk():
    """Frames with identical queries in one chunk get identical outputs (one set of bases),
    while the two chunks (uncond, cond) get bases of their own."""
    q, k, v = qkv(B=4, N=8, seed=2)
    q[1:] = q[0]
    k[2:] = k[2:] * 3
    out = stem_attention(q, k, v, 2, num_chunks=2, em=EMParams(4).seeded(0))
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[2], out[3])
    assert not torch.allclose(out[0], out[2], atol=1e-3)


def test_stem_attention_is_seeded():
    q, k, v = qkv()
    a = stem_attention(q, k, v, 2, em=EMParams(4).seeded(5))
    b = stem_attention(q, k, v, 2, em=EMParams(4).seeded(5))
    assert torch.equal(a, b)


def test_stem_attention_half_precision_stays_half_and_close():
    q, k, v = qkv(B=2, N=64, heads=2, d=8)
    ref = stem_attention(q, k, v, 2, em=EMParams(8).seeded(0))
    out = stem_attention(*(x.bfloat16() for x in (q, k, v)), 2, em=EMParams(8).seeded(0))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().mean() < 0.05


def test_uneven_chunks_are_refused():
    q, k, v = qkv(B=5)
    with pytest.raises(ValueError, match="equal chunks"):
        stem_attention(q, k, v, 2, num_chunks=2, em=EMParams(4))


@pytest.mark.parametrize("fn", ["full", "stem"])
def test_precision_runs_half_inputs_in_fp32_and_returns_their_dtype(fn):
    """SD2.x's attn_precision fp32: half-precision q, k, v attend in fp32, output in half."""
    q, k, v = (x * 4 for x in qkv(B=4, N=16))
    run = {"full": lambda *a, **kw: full_attention(*a, 2, num_chunks=2, **kw),
           "stem": lambda *a, **kw: stem_attention(*a, 2, em=EMParams(8).seeded(0), **kw)}[fn]
    exact = run(*(x.half().float() for x in (q, k, v)))
    upcast = run(*(x.half() for x in (q, k, v)), precision=torch.float32)
    assert upcast.dtype == torch.float16
    torch.testing.assert_close(upcast.float(), exact, rtol=2e-3, atol=2e-3)  # only the output's rounding to half


def test_full_attention_memory_estimate_counts_copies_and_optionally_the_weights():
    from stem.attention import full_attention_bytes

    assert full_attention_bytes(16, 4096, 320, 8) == 4 * 16 * 4096 * 320 * 4
    assert full_attention_bytes(16, 4096, 320, 8, num_groups=2, element_size=2) == 2 * 4 * 16 * 4096 * 320 * 2
    T = 2 * 10
    assert full_attention_bytes(2, 10, 8, 2, fused=False) == (4 * T * 8 + 2 * T * T) * 4


def _passes(x, num_chunks, bounds):
    """Rows of the frames [a, b) of every chunk, for each (a, b) in bounds: one pass each."""
    F = x.shape[0] // num_chunks
    return [torch.cat([x[c * F + a: c * F + b] for c in range(num_chunks)]) for a, b in bounds]


@pytest.mark.parametrize("bounds", [[(0, 6)], [(0, 3), (3, 6)], [(0, 4), (4, 6)], [(0, 1), (1, 2), (2, 6)]])
@pytest.mark.parametrize("num_chunks", [1, 2])
def test_attention_over_passes_equals_one_pass_bit_for_bit(bounds, num_chunks):
    """A clip too long for one UNet call runs in passes; STEM's bases and inflated attention
    still span every frame of each chunk, and nothing changes but the execution."""
    from stem.attention import full_attention_passes, stem_attention_passes

    q, k, v = qkv(B=6 * num_chunks, N=10)
    qs, ks, vs = (_passes(x, num_chunks, bounds) for x in (q, k, v))
    # chunks of 16 tokens straddle the passes' 10-token frames
    one = stem_attention(q, k, v, 2, num_chunks=num_chunks, em=EMParams(8, chunk_size=16).seeded(3))
    many = stem_attention_passes(qs, ks, vs, 2, num_chunks, em=EMParams(8, chunk_size=16).seeded(3))
    assert torch.equal(torch.cat(many), torch.cat(_passes(one, num_chunks, bounds)))
    one = full_attention(q, k, v, 2, num_chunks=num_chunks)
    many = full_attention_passes(qs, ks, vs, 2, num_chunks)
    assert torch.equal(torch.cat(many), torch.cat(_passes(one, num_chunks, bounds)))


def test_stem_bases_take_values_as_functions_made_once_each():
    """A long clip's values are projected only for EM's last iteration, one pass at a time."""
    from stem.attention import stem_bases

    q, k, v = qkv(B=12, N=10)
    ks, vs = [k[:4], k[4:8], k[8:]], [v[:4], v[4:8], v[8:]]
    made = []

    def maker(x):
        def make():
            made.append(x.shape[0])
            return x
        return make

    eager = stem_bases(ks, vs, 2, 2, EMParams(8, chunk_size=16).seeded(3))
    lazy = stem_bases(ks, [maker(x) for x in vs], 2, 2, EMParams(8, chunk_size=16).seeded(3))
    assert made == [4, 4, 4]
    assert torch.equal(lazy[0], eager[0]) and torch.equal(lazy[1], eager[1])
