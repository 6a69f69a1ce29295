"""TokenFlow propagation (REFERENCE §5, steps 3 and 4) against plain formulas and the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stem.tokenflow import (
    DEFAULT_SIM_BLOCK_ELEMENTS,
    batch_ranges,
    nearest_neighbour_field,
    nn_chunk_rows,
    propagate,
    batch_fields,
    keyframe_attention,
    propagate_outputs,
    propagation_weights,
    sample_keyframes,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _reference_block(norm_src, pivot_src, kf_attn, batch_idx, n_frames):
    """The reference's propagation in one transformer block, transcribed (TokenFlow utils).

    norm_src [n_frames, N, C] source norm1(x); pivot_src [K, N, C]; kf_attn [G, K, N, C].
    """
    g, _, n, dim = kf_attn.shape
    batch_idxs = [batch_idx]
    if batch_idx > 0:
        batch_idxs.append(batch_idx - 1)
    x = norm_src.reshape(-1, dim)
    y = pivot_src[batch_idxs].reshape(-1, dim)
    x = x / x.norm(dim=-1, keepdim=True)
    y = y / y.norm(dim=-1, keepdim=True)
    sim = x @ y.T
    if len(batch_idxs) == 2:
        sim1, sim2 = sim.chunk(2, dim=1)
        idx1 = sim1.argmax(dim=-1)
        idx2 = sim2.argmax(dim=-1)
    else:
        idx1 = sim.argmax(dim=-1)
    attn_1 = kf_attn[:, batch_idx]
    out1 = attn_1.gather(dim=1, index=idx1[None, :, None].repeat(g, 1, dim))
    if batch_idx == 0:
        return out1.view(g, n_frames, n, dim)
    attn_2 = kf_attn[:, batch_idx - 1]
    out2 = attn_2.gather(dim=1, index=idx2[None, :, None].repeat(g, 1, dim))
    s = torch.arange(0, n_frames) + batch_idxs[0] * n_frames
    p1 = batch_idxs[0] * n_frames + n_frames // 2
    p2 = batch_idxs[1] * n_frames + n_frames // 2
    d1 = torch.abs(s - p1)
    d2 = torch.abs(s - p2)
    w1 = torch.sigmoid(d2 / (d1 + d2))[None, :, None, None]
    return w1 * out1.view(g, n_frames, n, dim) + (1 - w1) * out2.view(g, n_frames, n, dim)


# --- batches and keyframes -------------------------------------------------------------------


def test_batch_ranges_cover_clip_in_order_with_short_last_batch():
    assert batch_ranges(16, 8) == [range(0, 8), range(8, 16)]
    assert batch_ranges(20, 8) == [range(0, 8), range(8, 16), range(16, 20)]
    assert batch_ranges(3, 8) == [range(0, 3)]


def test_keyframes_equal_reference_draw_for_full_batches():
    num_frames, bs = 48, 8
    expected = torch.randint(bs, (num_frames // bs,), generator=_gen(1)) + torch.arange(
        0, num_frames, bs
    )
    assert torch.equal(sample_keyframes(num_frames, bs, _gen(1)), expected)

    # Without a generator it consumes the global RNG exactly as the reference does.
    torch.manual_seed(1)
    expected_global = torch.randint(bs, (num_frames // bs,)) + torch.arange(0, num_frames, bs)
    torch.manual_seed(1)
    assert torch.equal(sample_keyframes(num_frames, bs), expected_global)


def test_keyframes_seeded_are_reproducible_and_seeds_differ():
    a = sample_keyframes(120, 8, _gen(3))
    b = sample_keyframes(120, 8, _gen(3))
    c = sample_keyframes(120, 8, _gen(4))
    assert a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_keyframes_one_inside_each_group_including_short_last_group():
    num_frames, bs = 19, 8  # groups 0..7, 8..15, 16..18
    groups = batch_ranges(num_frames, bs)
    gen = _gen(0)
    seen_last = set()
    for _ in range(200):
        kf = sample_keyframes(num_frames, bs, gen)
        assert kf.shape == (len(groups),)
        for k, group in zip(kf.tolist(), groups):
            assert k in group
        seen_last.add(kf[-1].item())
    assert seen_last == {16, 17, 18}
    # The short group's offset is its own randint(3) after the reference's draw for the full
    # groups, uniform over its 3 frames rather than folded from 0..7.
    for seed in range(10):
        gen = _gen(seed)
        full = torch.randint(8, (2,), generator=gen)
        short = torch.randint(3, (1,), generator=gen)
        expected = torch.cat([full, short]) + torch.tensor([0, 8, 16])
        assert torch.equal(sample_keyframes(num_frames, bs, _gen(seed)), expected)


# --- nearest-neighbour field -----------------------------------------------------------------


def test_nn_field_equals_token_by_token_cosine_argmax():
    gen = _gen(5)
    frames = torch.randn(3, 6, 4, generator=gen)
    keyframe = torch.randn(7, 4, generator=gen)
    f64, k64 = frames.double().numpy(), keyframe.double().numpy()
    expected = np.zeros((3, 6), dtype=np.int64)
    for f in range(3):
        for i in range(6):
            x = f64[f, i]
            cos = [x @ k64[j] / (np.linalg.norm(x) * np.linalg.norm(k64[j])) for j in range(7)]
            expected[f, i] = int(np.argmax(cos))
    idx = nearest_neighbour_field(frames, keyframe)
    assert idx.dtype == torch.long
    assert idx.shape == (3, 6)
    assert np.array_equal(idx.numpy(), expected)


def test_nn_field_maps_token_permutation_of_keyframe_back_to_permutation():
    gen = _gen(6)
    keyframe = torch.randn(64, 16, generator=gen)
    perms = torch.stack([torch.randperm(64, generator=gen) for _ in range(4)])
    # Scaling a token leaves its cosine similarity unchanged.
    frames = keyframe[perms] * torch.rand(4, 64, 1, generator=gen).add(0.5)
    assert torch.equal(nearest_neighbour_field(frames, keyframe, chunk_size=17), perms)


@pytest.mark.parametrize("chunk_size", [1, 7, 256, 1000, 1280, 5000])
def test_chunked_nn_field_equals_unchunked(chunk_size):
    gen = _gen(7)
    frames = torch.randn(5, 256, 32, generator=gen)
    keyframe = torch.randn(256, 32, generator=gen)
    x = torch.nn.functional.normalize(frames.reshape(-1, 32), dim=-1)
    y = torch.nn.functional.normalize(keyframe, dim=-1)
    unchunked = (x @ y.T).argmax(dim=-1).view(5, 256)
    assert torch.equal(nearest_neighbour_field(frames, keyframe, chunk_size), unchunked)


def test_nn_field_compares_fp16_inputs_in_fp32():
    # cos(q, k0) = 0.9998 and cos(q, k1) = 0.99995 both round to 1.0 in fp16, where argmax
    # would pick k0; fp32 tells them apart and picks k1.
    q = torch.tensor([[[1.0, 0.0]]], dtype=torch.float16)
    keys = torch.tensor([[1.0, 0.02], [1.0, 0.01]], dtype=torch.float16)
    half_sim = torch.nn.functional.normalize(q[0], dim=-1) @ torch.nn.functional.normalize(
        keys, dim=-1
    ).T
    assert half_sim[0, 0] == half_sim[0, 1]  # the premise: fp16 cannot tell them apart
    assert nearest_neighbour_field(q, keys).item() == 1


def test_default_chunk_bounds_similarity_block_for_120_frames_of_4096_tokens(monkeypatch):
    """A 120-frame 64x64 layer would need an 8 GiB similarity matrix in one piece; the default
    blocks stay at 64 MiB. Small C keeps it fast; the block size does not depend on C."""
    n_frames, n_tokens, channels = 120, 4096, 8
    assert nn_chunk_rows(n_tokens) == 4096
    gen = _gen(8)
    keyframe = torch.randn(n_tokens, channels, generator=gen)
    perms = torch.stack([torch.randperm(n_tokens, generator=gen) for _ in range(n_frames)])
    frames = keyframe[perms]

    blocks: list[int] = []
    real_mm = torch.mm

    def recording_mm(a, b, *, out=None):
        result = real_mm(a, b, out=out)
        blocks.append(result.numel())
        return result

    monkeypatch.setattr(torch, "mm", recording_mm)
    idx = nearest_neighbour_field(frames, keyframe)
    monkeypatch.undo()

    assert len(blocks) == n_frames  # 4096 query rows per block
    largest_bytes = max(blocks) * 4
    assert largest_bytes <= DEFAULT_SIM_BLOCK_ELEMENTS * 4 == 64 * 2**20
    assert largest_bytes * 100 < n_frames * n_tokens * n_tokens * 4  # vs 8 GiB unchunked
    assert torch.equal(idx, perms)


# --- weights -----------------------------------------------------------------------------------


def test_reference_weights_for_batch_size_8_match_sigmoid_of_midpoint_distances():
    frames = torch.arange(8, 16)
    w = propagation_weights(frames, batch_index=1, batch_size=8)
    # p1 = 12, p2 = 4: d1 = |s - 12|, d2 = |s - 4|.
    expected = [_sigmoid(abs(s - 4) / (abs(s - 12) + abs(s - 4))) for s in range(8, 16)]
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor(expected), atol=1e-7, rtol=0)
    assert w.min().item() == pytest.approx(_sigmoid(0.5), abs=1e-7)  # 0.6225, frame 8
    assert w.max().item() == pytest.approx(_sigmoid(1.0), abs=1e-7)  # 0.7311, frame 12
    assert 0.622 < w.min().item() and w.max().item() < 0.732


def test_batch_zero_weights_are_one():
    assert torch.equal(propagation_weights(torch.arange(8), 0, 8), torch.ones(8))


def test_short_last_batch_weights_use_nominal_midpoint():
    frames = torch.arange(16, 20)  # 20 frames, bs 8: last batch holds 4 frames
    w = propagation_weights(frames, batch_index=2, batch_size=8)
    # p1 = 2*8 + 4 = 20 (past the clip's end), p2 = 8 + 4 = 12.
    expected = [_sigmoid(abs(s - 12) / (abs(s - 20) + abs(s - 12))) for s in range(16, 20)]
    assert torch.allclose(w, torch.tensor(expected), atol=1e-7, rtol=0)


def test_true_keyframe_positions_measure_distance_to_sampled_keyframes():
    keyframes = torch.tensor([1, 15, 17])
    frames = torch.arange(8, 16)
    w = propagation_weights(frames, 1, 8, keyframes, use_true_keyframe_positions=True)
    expected = [_sigmoid(abs(s - 1) / (abs(s - 15) + abs(s - 1))) for s in range(8, 16)]
    assert torch.allclose(w, torch.tensor(expected), atol=1e-7, rtol=0)
    assert not torch.allclose(w, propagation_weights(frames, 1, 8, keyframes))
    with pytest.raises(ValueError):
        propagation_weights(frames, 1, 8, None, use_true_keyframe_positions=True)


# --- propagation ---------------------------------------------------------------------------------


def test_propagate_gathers_same_index_for_every_branch():
    gen = _gen(9)
    kf_out = torch.randn(3, 5, 4, generator=gen)
    idx = torch.randint(5, (2, 6), generator=gen)
    out = propagate(kf_out, idx)
    assert out.shape == (3, 2, 6, 4)
    for g in range(3):
        for f in range(2):
            for i in range(6):
                assert torch.equal(out[g, f, i], kf_out[g, idx[f, i]])


def test_propagate_blends_two_keyframes_with_per_frame_weight():
    gen = _gen(10)
    kf_out, kf_prev = torch.randn(2, 3, 5, 4, generator=gen)
    idx = torch.randint(5, (2, 6), generator=gen)
    idx_prev = torch.randint(5, (2, 6), generator=gen)
    w = torch.tensor([0.7, 0.25])
    out = propagate(kf_out, idx, kf_prev, idx_prev, w)
    for g in range(3):
        for f in range(2):
            for i in range(6):
                expected = w[f] * kf_out[g, idx[f, i]] + (1 - w[f]) * kf_prev[g, idx_prev[f, i]]
                assert torch.allclose(out[g, f, i], expected, atol=1e-6)
    with pytest.raises(ValueError):
        propagate(kf_out, idx, kf_prev, idx_prev)  # no weights


def test_propagate_keeps_fp16_dtype_and_blends_in_fp32():
    gen = _gen(11)
    kf_out, kf_prev = torch.randn(2, 3, 5, 4, generator=gen).half()
    idx = torch.randint(5, (2, 6), generator=gen)
    w = propagation_weights(torch.arange(8, 10), 1, 8)
    out = propagate(kf_out, idx, kf_prev, idx, w)
    expected = w[None, :, None, None] * kf_out[:, idx].float() + (1 - w[None, :, None, None]) * (
        kf_prev[:, idx].float()
    )
    assert out.dtype == torch.float16
    assert torch.equal(out, expected.half())


def propagate_batch(batch_source, keyframe_source, keyframe_outputs, batch_index, batch_size, keyframes=None,
                    use_true_keyframe_positions=False, chunk_size=None):
    """One block's propagation pass as the hooks run it: the fields from the source branch's
    norm1(x) (attn1 patch), then the outputs of every branch (attn1 output patch)."""
    if keyframe_outputs.shape[1] != keyframe_source.shape[0]:
        raise ValueError("one recorded output per keyframe")
    fields = batch_fields(batch_source, keyframe_source, batch_index, batch_size, keyframes,
                          use_true_keyframe_positions, chunk_size)
    prev = keyframe_outputs[:, batch_index - 1] if batch_index > 0 else None
    return propagate_outputs(keyframe_outputs[:, batch_index], fields, prev)


def test_identical_frames_return_keyframe_outputs_exactly_in_batch_zero():
    gen = _gen(12)
    n, c = 32, 8
    keyframe_source = torch.randn(2, n, c, generator=gen)
    keyframe_outputs = torch.randn(3, 2, n, c, generator=gen)
    batch = keyframe_source[0].expand(4, n, c)
    out = propagate_batch(batch, keyframe_source, keyframe_outputs, 0, 4)
    assert torch.equal(out, keyframe_outputs[:, 0, None].expand(3, 4, n, c))


def test_identical_frames_with_equal_keyframe_outputs_return_them_exactly_in_later_batch():
    gen = _gen(13)
    n, c = 32, 8
    source = torch.randn(n, c, generator=gen)
    output = torch.randn(3, n, c, generator=gen)
    keyframe_source = source.expand(3, n, c)
    keyframe_outputs = output[:, None].expand(3, 3, n, c)
    for b in (1, 2):
        out = propagate_batch(source.expand(4, n, c), keyframe_source, keyframe_outputs, b, 4)
        assert torch.equal(out, output[:, None].expand(3, 4, n, c))


@pytest.mark.parametrize("batch_index", [0, 1, 2])
def test_propagate_batch_matches_reference_transcription(batch_index):
    gen = _gen(20 + batch_index)
    bs, k, n, c = 4, 3, 16, 8
    batch_source = torch.randn(bs, n, c, generator=gen)
    keyframe_source = torch.randn(k, n, c, generator=gen)
    keyframe_outputs = torch.randn(3, k, n, c, generator=gen)
    expected = _reference_block(batch_source, keyframe_source, keyframe_outputs, batch_index, bs)
    out = propagate_batch(
        batch_source, keyframe_source, keyframe_outputs, batch_index, bs, chunk_size=5
    )
    assert out.shape == (3, bs, n, c)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_propagate_batch_short_last_batch_uses_its_own_frames_and_nominal_midpoint():
    gen = _gen(30)
    bs, n, c = 8, 16, 4
    keyframe_source = torch.randn(3, n, c, generator=gen)
    keyframe_outputs = torch.randn(2, 3, n, c, generator=gen)
    batch_source = torch.randn(4, n, c, generator=gen)  # frames 16..19 of a 20-frame clip
    out = propagate_batch(batch_source, keyframe_source, keyframe_outputs, 2, bs)
    idx = nearest_neighbour_field(batch_source, keyframe_source[2])
    idx_prev = nearest_neighbour_field(batch_source, keyframe_source[1])
    w = torch.tensor([_sigmoid(abs(s - 12) / (abs(s - 20) + abs(s - 12))) for s in range(16, 20)])
    expected = w[None, :, None, None] * keyframe_outputs[:, 2][:, idx] + (
        1 - w[None, :, None, None]
    ) * keyframe_outputs[:, 1][:, idx_prev]
    assert out.shape == (2, 4, n, c)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_propagate_batch_true_positions_change_the_blend_only():
    gen = _gen(31)
    bs, n, c = 4, 16, 4
    keyframe_source = torch.randn(2, n, c, generator=gen)
    keyframe_outputs = torch.randn(3, 2, n, c, generator=gen)
    batch_source = torch.randn(bs, n, c, generator=gen)
    keyframes = torch.tensor([0, 7])
    out = propagate_batch(batch_source, keyframe_source, keyframe_outputs, 1, bs, keyframes, True)
    idx = nearest_neighbour_field(batch_source, keyframe_source[1])
    idx_prev = nearest_neighbour_field(batch_source, keyframe_source[0])
    w = propagation_weights(torch.arange(4, 8), 1, bs, keyframes, use_true_keyframe_positions=True)
    expected = propagate(keyframe_outputs[:, 1], idx, keyframe_outputs[:, 0], idx_prev, w)
    assert torch.equal(out, expected)
    reference = propagate_batch(batch_source, keyframe_source, keyframe_outputs, 1, bs, keyframes)
    assert not torch.allclose(out, reference)


def test_propagation_rejects_mismatched_inputs():
    src = torch.randn(2, 4, 3)
    with pytest.raises(ValueError):
        batch_fields(torch.randn(9, 4, 3), src, 0, 8)  # 9 > bs
    with pytest.raises(ValueError):
        batch_fields(torch.randn(4, 4, 3), src, 2, 8)  # no keyframe 2
    fields = batch_fields(torch.randn(4, 4, 3), src, 1, 8)
    with pytest.raises(ValueError, match="outputs_prev"):
        propagate_outputs(torch.randn(3, 4, 3), fields)  # batch 1 blends two keyframes
    with pytest.raises(ValueError):
        propagate_outputs(torch.randn(3, 2, 4, 3), fields)  # not [G, M, C]


def test_keyframe_attention_is_extended_attention_with_source_queries_and_keys():
    """Every keyframe attends to all keyframes' tokens (REFERENCE §5.3); in the PnP window the
    source's q and k replace the branch's, its values stay (§5.2)."""
    gen = _gen(40)
    K, N, heads, d = 3, 5, 2, 4
    q, k, v, sq, sk = (torch.randn(K, N, heads * d, generator=gen) for _ in range(5))

    def transcription(q, k, v):
        out = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qa, ka, va = q[..., sl].reshape(K * N, d), k[..., sl].reshape(K * N, d), v[..., sl].reshape(K * N, d)
            out.append(torch.softmax(qa @ ka.T / d**0.5, -1) @ va)
        return torch.cat(out, -1).reshape(K, N, heads * d)

    torch.testing.assert_close(keyframe_attention(q, k, v, heads), transcription(q, k, v))
    torch.testing.assert_close(keyframe_attention(q, k, v, heads, (sq, sk)), transcription(sq, sk, v))
    half = keyframe_attention(q.half(), k.half(), v.half(), heads, precision=torch.float32)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), transcription(q.half().float(), k.half().float(), v.half().float()),
                               rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError):
        keyframe_attention(q, k, v, heads, (sq[:2], sk[:2]))


@pytest.mark.parametrize("cuts", [[1, 3], [2, 3], [1, 2, 3]])
@pytest.mark.parametrize("pnp", [False, True])
def test_keyframe_attention_over_passes_is_the_one_pass_attention(cuts, pnp):
    """Keyframes split into passes still attend to every keyframe's tokens, the
    source's q/k substituted pass by pass: the same result as one pass."""
    from stem.tokenflow import keyframe_attention_passes

    gen = _gen(41)
    K, N, heads, d = 3, 5, 2, 4
    q, k, v, sq, sk = (torch.randn(K, N, heads * d, generator=gen) for _ in range(5))
    bounds = list(zip([0] + cuts[:-1], cuts))
    part = lambda x: [x[a:b] for a, b in bounds]  # noqa: E731
    sqks = [(a, b) for a, b in zip(part(sq), part(sk))] if pnp else [None] * len(bounds)
    many = keyframe_attention_passes(part(q), part(k), part(v), heads, sqks)
    one = keyframe_attention(q, k, v, heads, (sq, sk) if pnp else None)
    assert [m.shape[0] for m in many] == [b - a for a, b in bounds]
    torch.testing.assert_close(torch.cat(many), one, rtol=0, atol=1e-6)
