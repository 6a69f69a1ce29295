"""STEM bases: the expectation-maximisation of REFERENCE §4.

A group of frames contributes all of its ``T = F*N`` key tokens; EM condenses them into
``M`` bases per head (256 by default), and every query of the group then attends to those
bases instead of to the tokens. Everything is batched over arbitrary leading dimensions
(groups, heads), so there is no Python loop over heads or frames.

Shapes: ``keys``/``values`` ``[..., T, d]``; bases ``[..., M, d]``.
"""
from __future__ import annotations

import torch

# REFERENCE §4 constants.
DEFAULT_NUM_BASES = 256
DEFAULT_EM_ITERS = 5
DEFAULT_TAU = 0.01
MU_NORM_EPS = 1e-4  # normalize(mu) = mu / (||mu|| + 1e-4)
COLUMN_EPS = 1e-4  # zn = z / (sum_n z + 1e-4)
# Automatic token chunks keep the live responsibilities (logits and softmax, fp32) near this.
# Chunks of 256-2048 tokens (x 8 heads x 256 bases) stay in cache and ran within 15% of each
# other on an idle 2-core CPU; the larger end means fewer, bigger ops, which suffer far less
# when another process competes for the cores.
DEFAULT_EM_MEMORY_BYTES = 32 * 2**20


def auto_chunk_size(lead: int, num_bases: int, budget_bytes: int = DEFAULT_EM_MEMORY_BYTES) -> int:
    """Tokens per chunk so that ``lead`` (groups x heads) ``[chunk, M]`` fp32 blocks, two of
    them alive at once, fit in ``budget_bytes``. At least 256 tokens."""
    return max(256, budget_bytes // (2 * 4 * max(1, lead) * max(1, num_bases)))


def init_bases(
    keys: torch.Tensor,
    num_bases: int = DEFAULT_NUM_BASES,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Random initial bases ``mu ~ Normal(mean_n K, std_n K)``, per head and channel.

    keys: ``[..., T, d]``. Returns fp32 ``[..., M, d]``.
    The reference draws with ``torch.normal`` on every call; here the standard normal is
    drawn on the CPU from ``generator`` so that a seed gives the same bases on any device.
    Mean and (unbiased) std are two fp32 passes over token chunks, so a half-precision
    input is never copied whole.
    """
    T = keys.shape[-2]
    if chunk_size is None:
        chunk_size = auto_chunk_size(keys[..., 0, 0].numel(), num_bases)
    step = _step(T, chunk_size)
    total = sum(keys[..., s : s + step, :].float().sum(dim=-2, keepdim=True) for s in range(0, T, step))
    mean = total / T
    if T > 1:
        sq = sum(((keys[..., s : s + step, :].float() - mean) ** 2).sum(dim=-2, keepdim=True) for s in range(0, T, step))
        std = (sq / (T - 1)).sqrt()
    else:  # a single token has no spread: start every basis on it
        std = torch.zeros_like(mean)
    shape = (*keys.shape[:-2], num_bases, keys.shape[-1])
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    return mean + std * noise.to(keys.device)


def _step(T: int, chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return min(T, int(chunk_size))


def _e_step_chunk(k_chunk: torch.Tensor, mu_normed: torch.Tensor, tau: float) -> torch.Tensor:
    """Responsibilities of one chunk of tokens: softmax over bases. ``[..., c, M]``."""
    logits = torch.matmul(k_chunk, mu_normed.transpose(-1, -2)).div_(tau)
    return torch.softmax(logits, dim=-1)


def em_bases(
    keys: torch.Tensor,
    values: torch.Tensor | None = None,
    num_bases: int = DEFAULT_NUM_BASES,
    iters: int = DEFAULT_EM_ITERS,
    tau: float = DEFAULT_TAU,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Estimate the key bases ``mu`` and the value bases ``V_b`` of REFERENCE §4.

    keys, values: ``[..., T, d]`` (any float dtype; all arithmetic is fp32).
    Returns ``(mu, v_bases)``, fp32 ``[..., M, d]``; ``v_bases`` is None without values.

    Each iteration: E-step ``z = softmax_m(K . normalize(mu) / tau)``, column normalisation
    ``zn = z / (sum_n z + 1e-4)``, M-step ``mu = zn^T K``. The value bases come from the
    responsibilities of the last iteration, and the returned ``mu`` is the last,
    unnormalised one, as in the reference.

    ``chunk_size`` processes the tokens in slices of that many rows: ``zn^T K`` equals
    ``diag(1 / (colsum + eps)) z^T K``, so only ``[..., chunk, M]`` responsibilities are
    ever alive instead of ``[..., T, M]``. The result matches the unchunked one to fp32
    rounding (only the summation order differs). None picks a chunk from a 32 MiB budget
    (:func:`auto_chunk_size`); a chunk of at least T tokens is the plain unchunked EM.
    """
    if iters < 1:
        raise ValueError(f"em_iters must be at least 1, got {iters}")
    if num_bases < 1:
        raise ValueError(f"num_bases must be at least 1, got {num_bases}")
    if values is not None and values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in tokens")
    T = keys.shape[-2]
    if chunk_size is None:
        chunk_size = auto_chunk_size(keys[..., 0, 0].numel(), num_bases)
    step = _step(T, chunk_size)
    mu = init_bases(keys, num_bases, generator, step) if init is None else init.float()

    v_bases = None
    for it in range(iters):
        want_v = values is not None and it == iters - 1
        mu_normed = mu / (mu.norm(dim=-1, keepdim=True) + MU_NORM_EPS)
        colsum = zk = zv = None
        for s in range(0, T, step):
            kc = keys[..., s : s + step, :].float()
            z = _e_step_chunk(kc, mu_normed, tau)
            zt = z.transpose(-1, -2)
            parts = (z.sum(dim=-2), torch.matmul(zt, kc))
            pv = torch.matmul(zt, values[..., s : s + step, :].float()) if want_v else None
            if colsum is None:
                colsum, zk, zv = parts[0], parts[1], pv
            else:
                colsum += parts[0]
                zk += parts[1]
                if want_v:
                    zv += pv
        inv = (1.0 / (colsum + COLUMN_EPS)).unsqueeze(-1)
        mu = zk * inv
        if want_v:
            v_bases = zv * inv
    return mu, v_bases
