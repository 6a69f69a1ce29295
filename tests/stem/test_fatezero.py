"""FateZero's attention fusion (stem/fatezero.py, docs/FATEZERO.md) on plain tensors and hand-built
prompts: word positions, the word-swap and refinement mappers, the windows, the cross-attention
controllers, the blend mask, and the fusion maths on STEM bases."""
import math

import pytest
import torch

from stem.attention import sparse_causal_attention, sparse_causal_frames, stem_attention
from stem.em import EMParams, init_bases
from stem.fatezero import (
    REFINE,
    REPLACE,
    CrossControl,
    PromptTokens,
    attend_probabilities,
    attention_probabilities,
    blend_latents,
    blend_mask,
    cross_replace_alpha,
    equalizer,
    fuse,
    latent_blend_window,
    refinement_mapper,
    replacement_mapper,
    window,
    word_map,
)

BOS, EOS = 49406, 49407


def prompt(text: str, tokens: list[tuple[int, str]]) -> PromptTokens:
    """A prompt with its tokens as (id, decoded text) between BOS and EOS."""
    return PromptTokens(text, (BOS, *(i for i, _ in tokens), EOS), tuple(t for _, t in tokens))


CAT = prompt("a cat is sitting", [(320, "a"), (2368, "cat"), (533, "is"), (4919, "sitting")])
DOG = prompt("a dog is sitting", [(320, "a"), (1929, "dog"), (533, "is"), (4919, "sitting")])
SPIDER = prompt("a spiderman is sitting", [(320, "a"), (7622, "spider"), (786, "man"), (533, "is"), (4919, "sitting")])
FLUFFY = prompt("a fluffy cat is sitting", [(320, "a"), (14533, "fluffy"), (2368, "cat"), (533, "is"), (4919, "sitting")])


def test_word_positions_follow_the_decoded_lengths_of_the_tokens():
    assert CAT.positions("cat") == [2] and CAT.positions(1) == [2] and CAT.positions("sitting") == [4]
    assert SPIDER.positions("spiderman") == [2, 3] and SPIDER.positions("is") == [4]
    assert CAT.positions("horse") == []
    twice = prompt("a cat and a cat", [(320, "a"), (2368, "cat"), (537, "and"), (320, "a"), (2368, "cat")])
    assert twice.positions("cat") == [2, 5]


def test_a_word_swap_maps_the_swapped_tokens_and_keeps_the_rest():
    m = replacement_mapper(CAT, DOG)
    assert m.shape == (77, 77) and torch.equal(m, torch.eye(77))  # one token for one: the identity
    m = replacement_mapper(CAT, SPIDER)
    assert m[2, 2] == m[2, 3] == 0.5  # 'cat' spreads over 'spider' 'man'
    assert m[0, 0] == m[1, 1] == 1
    # FateZero's quirk past the last swapped word: the diagonal from j on, so source 'is' (row 3)
    # maps nowhere and the target's columns after it take the source's shifted rows
    assert m[3].sum() == 0 and m[4, 4] == 1 and m[5, 5] == 1
    with pytest.raises(ValueError, match="as many words: the source has 4 and the target 5"):
        replacement_mapper(CAT, FLUFFY)


def test_refinement_aligns_tokens_and_gives_new_tokens_their_own_attention():
    mapper, alphas = refinement_mapper(CAT, FLUFFY)
    # target BOS a fluffy cat is sitting EOS <- source BOS a - cat is sitting EOS
    assert mapper[:7].tolist() == [0, 1, -1, 2, 3, 4, 5]
    assert alphas[:7].tolist() == [1, 1, 0, 1, 1, 1, 1] and alphas[7:].eq(1).all()
    assert mapper[7:].tolist() == list(range(7, 77))  # padding one to one


def test_reweighting_scales_the_words_columns():
    eq = equalizer(SPIDER, ["spiderman"], [10.0])
    assert eq[2] == eq[3] == 10 and eq.sum() == 75 + 20


def test_windows_count_steps_as_fatezero_does():
    alpha = cross_replace_alpha(50, 0.8)  # counted over S + 1 = 51 rows: int(0.8 * 51) = 40
    assert alpha.shape == (51, 77) and alpha[:40].eq(1).all() and alpha[40:].eq(0).all()
    assert window(50, 0.6) == (0, 30) and window(50, (0.2, 0.5)) == (10, 25)
    words = cross_replace_alpha(10, 1.0, {(2, 3): (0.0, 0.5)})
    assert words[:, 1].eq(1).all() and words[:5, 2].eq(1).all() and words[5:, 2].eq(0).all()
    assert list(latent_blend_window(50)) == list(range(10, 39))  # int(0.2*S) < i + 1 < int(0.8*S)


def probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g), dim=-1)


def test_cross_controllers_against_their_definitions():
    p_src, p_own = probs(2, 3, 5, 77, seed=1), probs(2, 3, 5, 77, seed=2)
    ones, zeros = torch.ones(77), torch.zeros(77)
    swap = CrossControl.between(CAT, SPIDER, REPLACE)
    torch.testing.assert_close(swap(p_src, p_own, ones), p_src @ swap.mapper)
    assert torch.equal(swap(p_src, p_own, zeros), p_own)  # outside the window: its own
    refine = CrossControl.between(CAT, FLUFFY, REFINE)
    out = refine(p_src, p_own, ones)
    torch.testing.assert_close(out[..., 3], p_src[..., 2])  # target 'cat' takes source 'cat'
    torch.testing.assert_close(out[..., 2], p_own[..., 2])  # 'fluffy' keeps its own
    eq = equalizer(FLUFFY, ["fluffy"], [10.0])
    reweighted = CrossControl.between(CAT, FLUFFY, REFINE, eq)(p_src, p_own, ones)
    torch.testing.assert_close(reweighted[..., 2], 10 * p_own[..., 2])
    half = torch.full((77,), 0.5)
    torch.testing.assert_close(refine(p_src, p_own, half), 0.5 * out + 0.5 * p_own)
    with pytest.raises(ValueError, match="controller: 'swap'"):
        CrossControl.between(CAT, DOG, "swap")


def test_probabilities_and_their_output_are_ordinary_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 16, generator=g) for n in (6, 77, 77))
    p = attention_probabilities(q, k, 4)
    assert p.shape == (2, 4, 6, 77)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.view(2, 6, 4, 4).transpose(1, 2), k.view(2, 77, 4, 4).transpose(1, 2), v.view(2, 77, 4, 4).transpose(1, 2))
    torch.testing.assert_close(attend_probabilities(p, v), expected.transpose(1, 2).reshape(2, 6, 16))


def test_the_blend_mask_pools_resizes_normalises_and_thresholds():
    F, r = 2, 4
    words = torch.zeros(77)
    words[[2, 3]] = 1
    p = torch.zeros(F, 2, r * r, 77)
    p[0, :, 5, 2] = 1.0  # frame 0: the word at token (1, 1) of the 4x4 map
    p[1, :, 15, 3] = 0.5  # frame 1: at (3, 3), weaker
    summed = word_map(p, words).view(F, r, r)
    assert summed[0, 1, 1] == 2.0 and summed.sum() == 2.0 + 1.0
    mask = blend_mask(summed, count=2, size=(8, 8), threshold=0.3)
    assert mask.shape == (F, 64)
    m0 = mask[0].view(8, 8)
    assert m0[:6, :6].eq(1).all() and m0[6:].eq(0).all() and m0[:, 6:].eq(0).all()  # 3x3 pooled, doubled
    m1 = mask[1].view(8, 8)
    assert m1[4:, 4:].eq(1).all() and m1[:4].eq(0).all()  # each frame normalised to its own maximum
    assert blend_mask(summed, 2, (8, 8), 1.0).eq(0).all()  # threshold 1: the source's attention alone
    assert blend_mask(torch.zeros(F, r, r), 2, (8, 8), 0.3).eq(0).all()  # words that drew nothing: 0


def test_fusion_blends_outputs_per_query_token():
    own, fused = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    out = fuse(own, fused, mask)
    assert torch.equal(out[0, 0], own[0, 0]) and torch.equal(out[0, 1], fused[0, 1])
    assert fuse(own, fused, None) is fused
    # equals blending materialised probability rows: m * P_own V + (1 - m) * P_src V
    p_own, p_src, v = probs(6, 6, seed=4), probs(6, 6, seed=5), torch.randn(6, 8)
    m = mask[0][:, None]
    torch.testing.assert_close(fuse(p_own @ v, p_src @ v, mask[0]), (m * p_own + (1 - m) * p_src) @ v)


def test_latents_are_blended_towards_the_edit_where_the_mask_is_one():
    x_inv, x_edit = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    mask = torch.zeros(2, 1, 3, 3)
    mask[:, :, 1, 1] = 1
    out = blend_latents(x_inv, x_edit, mask)
    assert out[:, :, 1, 1].eq(1).all() and out.sum() == 2 * 4


def _heads(x, heads):
    B, N, E = x.shape
    return x.view(B, N, heads, E // heads).permute(2, 0, 1, 3).reshape(heads, B * N, E // heads)


def test_fused_stem_attention_is_the_source_map_applied_to_the_edits_values():
    """O_fused = A_src V_edit with A_src = P_src zn_src^T (module docstring): stem_attention on the
    source's queries and keys with the edit's values, under the source's EM seed, equals that
    product formed explicitly from a per-head transcription of REFERENCE §4."""
    F, N, heads, d, M = 3, 8, 2, 4, 5
    g = torch.Generator().manual_seed(6)
    q_src, k_src, v_src, v_edit = (torch.randn(F, N, heads * d, generator=g) for _ in range(4))
    em = EMParams(M)
    fused = stem_attention(q_src, k_src, v_edit, heads, em=em.seeded(9))
    source = stem_attention(q_src, k_src, v_src, heads, em=em.seeded(9))
    assert torch.equal(stem_attention(q_src, k_src, v_src, heads, em=em.seeded(9)), source)  # seeded: replayable
    K, Q, Ve = (_heads(x, heads).double() for x in (k_src, q_src, v_edit))
    mu = init_bases(_heads(k_src, heads)[None], em.seeded(9))[0].double()
    for _ in range(em.iters):
        z = torch.softmax(K @ (mu / (mu.norm(dim=-1, keepdim=True) + 1e-4)).transpose(-1, -2) / em.tau, dim=-1)
        zn = z / (z.sum(dim=-2, keepdim=True) + 1e-4)
        mu = zn.transpose(-1, -2) @ K
    A = torch.softmax(Q @ mu.transpose(-1, -2) / math.sqrt(d), dim=-1) @ zn.transpose(-1, -2)  # [heads, FN, FN]
    expected = (A @ Ve).view(heads, F, N, d).permute(1, 2, 0, 3).reshape(F, N, heads * d)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused, source)


def test_sparse_causal_attention_attends_to_the_previous_and_the_first_frame():
    assert sparse_causal_frames(4) == [[0, 0, 1, 2], [0, 0, 0, 0]]
    assert sparse_causal_frames(5, ("mid",)) == [[2] * 5] and sparse_causal_frames(3, (1, "last")) == [[1, 2, 2], [2] * 3]
    F, N, heads, d = 4, 3, 2, 4
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2 * F, N, heads * d, generator=g) for _ in range(3))
    out = sparse_causal_attention(q, k, v, heads, num_chunks=2)
    for c in range(2):
        for f in range(F):
            row = c * F + f
            prev, first = c * F + max(f - 1, 0), c * F
            keys = torch.cat([k[prev], k[first]])
            vals = torch.cat([v[prev], v[first]])
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                p = torch.softmax(q[row, :, sl] @ keys[:, sl].T / math.sqrt(d), dim=-1)
                torch.testing.assert_close(out[row, :, sl], p @ vals[:, sl], rtol=1e-5, atol=1e-6)
