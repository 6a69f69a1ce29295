"""STEM bases (REFERENCE §4) against a per-head loop written from the spec."""
import math

import pytest
import torch

from stem.em import EMParams, em_bases, init_bases


def reference_em(K, V, mu, iters, tau):
    """One head at a time, explicit softmax, as the reference writes it. K, V: [T, d]; mu: [M, d]."""
    for _ in range(iters):
        mu_n = mu / (mu.norm(dim=1, keepdim=True) + 1e-4)
        logits = K @ mu_n.T / tau
        logits = logits - logits.max(dim=1, keepdim=True).values
        z = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
        zn = z / (z.sum(dim=0, keepdim=True) + 1e-4)
        mu = zn.T @ K
    return mu, zn.T @ V


def rand_kv(*lead, T=96, d=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, T, d, generator=g) * scale, torch.randn(*lead, T, d, generator=g))


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_batched_em_equals_per_head_loop(tau):
    K, V = rand_kv(2, 3, T=96, d=8)
    init = init_bases(K, EMParams(16).seeded(1))
    mu, vb = em_bases(K, V, EMParams(16, iters=5, tau=tau), init=init)
    assert mu.shape == vb.shape == (2, 3, 16, 8)
    for g in range(2):
        for h in range(3):
            mu_ref, vb_ref = reference_em(K[g, h].double(), V[g, h].double(), init[g, h].double(), 5, tau)
            torch.testing.assert_close(mu[g, h].double(), mu_ref, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(vb[g, h].double(), vb_ref, rtol=1e-3, atol=1e-4)


def test_init_is_normal_around_token_mean_and_unbiased_std():
    K = torch.randn(4, 2000, 3) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([2.0, -1.0, 0.0])
    mu = init_bases(K, EMParams(4096).seeded(0))
    assert mu.shape == (4, 4096, 3) and mu.dtype == torch.float32
    torch.testing.assert_close(mu.mean(1), K.mean(1), atol=0.15, rtol=0)
    torch.testing.assert_close(mu.std(1), K.std(1, unbiased=True), atol=0.1, rtol=0.05)


def test_init_of_single_token_is_that_token():
    K = torch.tensor([[[1.0, 2.0]]])
    mu = init_bases(K, EMParams(5).seeded(0))
    assert torch.equal(mu, K.expand(1, 5, 2))


def test_seeded_runs_are_identical_and_seeds_differ():
    K, V = rand_kv(3, T=64)
    a = em_bases(K, V, EMParams(8).seeded(7))
    b = em_bases(K, V, EMParams(8).seeded(7))
    c = em_bases(K, V, EMParams(8).seeded(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("chunk", [1, 7, 32, 95])
def test_chunked_em_equals_unchunked(chunk):
    K, V = rand_kv(2, 2, T=96, d=8, scale=3.0)
    full = em_bases(K, V, EMParams(16).seeded(3))
    part = em_bases(K, V, EMParams(16, chunk_size=chunk).seeded(3))
    torch.testing.assert_close(part[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part[1], full[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    K, V = rand_kv(2, T=4096, d=16, scale=4.0)
    Kh, Vh = K.to(dtype), V.to(dtype)
    mu, vb = em_bases(Kh, Vh, EMParams(32, chunk_size=1000).seeded(0))
    assert mu.dtype == vb.dtype == torch.float32
    # the same computation on the rounded inputs in fp64 (what fp32 accumulation approximates)
    init = init_bases(Kh, EMParams(32).seeded(0))
    mu_ref, vb_ref = reference_em(Kh[0].double(), Vh[0].double(), init[0].double(), 5, 0.01)
    torch.testing.assert_close(mu[0].double(), mu_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(vb[0].double(), vb_ref, rtol=1e-3, atol=1e-3)


def test_value_bases_use_last_responsibilities_and_mu_is_unnormalised():
    K, V = rand_kv(T=50, d=4, scale=5.0)
    init = init_bases(K, EMParams(6).seeded(0))
    mu, vb = em_bases(K, V, EMParams(6, iters=1), init=init)
    # one iteration: the responsibilities come from the initial bases
    mu_n = init / (init.norm(dim=-1, keepdim=True) + 1e-4)
    z = torch.softmax(K @ mu_n.T / 0.01, dim=-1)
    zn = z / (z.sum(0, keepdim=True) + 1e-4)
    torch.testing.assert_close(vb, zn.T @ V)
    torch.testing.assert_close(mu, zn.T @ K)
    assert mu.norm(dim=-1).max() > 1.5  # not renormalised: keys of scale 5 give long bases


def test_em_without_values_returns_only_key_bases():
    K, _ = rand_kv(T=20)
    mu, vb = em_bases(K, None, EMParams(4).seeded(0))
    assert vb is None and mu.shape == (4, 8)


def test_em_rejects_bad_arguments():
    K, V = rand_kv(T=20)
    with pytest.raises(ValueError, match="em_iters"):
        em_bases(K, V, EMParams(4, iters=0))
    with pytest.raises(ValueError, match="num_bases"):
        em_bases(K, V, EMParams(0))
    with pytest.raises(ValueError, match="differ"):
        em_bases(K, V[:10], EMParams(4))


def test_chunked_em_extra_memory_is_order_chunk_times_bases():
    """The responsibilities alive at once are [lead, chunk, M], never [lead, T, M]."""
    K, V = rand_kv(2, T=3000, d=4)
    seen = []
    real_softmax = torch.softmax

    def spy(x, dim):
        seen.append(x.shape)
        return real_softmax(x, dim=dim)

    torch.softmax = spy
    try:
        em_bases(K, V, EMParams(16, chunk_size=256).seeded(0))
    finally:
        torch.softmax = real_softmax
    assert seen and max(math.prod(s) for s in seen) <= 2 * 256 * 16


@pytest.mark.parametrize("sizes", [[40], [13, 27], [1, 16, 7, 16], [32, 8]])
def test_em_over_token_blocks_equals_em_over_their_concatenation(sizes):
    """Keys and values handed over in blocks (the frames of each pass) give the same bases,
    bit for bit, as the concatenated tensor: every chunk EM computes on holds the same tokens."""
    from stem.em import token_chunks

    g = torch.Generator().manual_seed(11)
    k = torch.randn(2, 3, sum(sizes), 4, generator=g)
    v = torch.randn(2, 3, sum(sizes), 4, generator=g)
    kb, vb = list(k.split(sizes, dim=-2)), list(v.split(sizes, dim=-2))
    whole = em_bases(k, v, EMParams(5, chunk_size=16).seeded(0))
    parts = em_bases(kb, vb, EMParams(5, chunk_size=16).seeded(0))
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])
    chunks = list(token_chunks(kb, 16))
    assert [c.shape[-2] for c in chunks] == [16, 16, 8] and all(c.is_contiguous() for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=-2), k)
    with pytest.raises(ValueError, match="differ in tokens"):
        em_bases(kb, vb[:-1] + [vb[-1][..., :1, :]], EMParams(5))


def test_em_calls_its_interrupt_before_every_chunk_and_stops_when_it_raises():
    """The host's Cancel: ``interrupt`` runs before each chunk's E-step, so a long EM stops within
    one chunk of a press."""
    K, V = rand_kv(T=100)
    calls = []
    em_bases(K, V, EMParams(4, iters=3, chunk_size=30, interrupt=lambda: calls.append(1)).seeded(0))
    assert len(calls) == 3 * 4  # 3 iterations of 4 chunks (30 + 30 + 30 + 10 tokens)

    class Cancelled(Exception):
        pass

    def cancel_on_the_fifth():
        calls.append(1)
        if len(calls) == 5:
            raise Cancelled

    calls.clear()
    with pytest.raises(Cancelled):
        em_bases(K, V, EMParams(4, iters=3, chunk_size=30, interrupt=cancel_on_the_fifth).seeded(0))
    assert len(calls) == 5
