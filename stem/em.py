"""STEM bases: the expectation-maximisation of REFERENCE §4.

A group of frames contributes all of its ``T = F*N`` key tokens; EM condenses them into
``M`` bases per head (256 by default), and every query of the group then attends to those
bases instead of to the tokens. Everything is batched over arbitrary leading dimensions
(groups, heads), so there is no Python loop over heads or frames.

Shapes: ``keys``/``values`` ``[..., T, d]``; bases ``[..., M, d]``. Keys and values may also
come as a sequence of token blocks ``[..., T_i, d]`` (the frames of one pass each, when a clip
runs through the UNet in several passes): EM then runs over their concatenation without ever
building it, and gives bit for bit what it gives on the concatenated tensor, since every
token chunk it computes on is the same (:func:`token_chunks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence, Union

import torch

Tokens = Union[torch.Tensor, Sequence[torch.Tensor]]

# REFERENCE §4 constants.
DEFAULT_NUM_BASES = 256
DEFAULT_EM_ITERS = 5
DEFAULT_TAU = 0.01
MU_NORM_EPS = 1e-4  # normalize(mu) = mu / (||mu|| + 1e-4)
COLUMN_EPS = 1e-4  # zn = z / (sum_n z + 1e-4)
# Automatic token chunks keep the live responsibilities (logits and softmax, fp32) near this:
# chunks small enough to stay in cache, large enough to be few, big ops (benchmarks/README.md).
DEFAULT_EM_MEMORY_BYTES = 32 * 2**20


@dataclass(frozen=True)
class EMParams:
    """The parameters of one EM estimation (REFERENCE §4).

    ``num_bases`` M, ``iters`` R, ``tau`` the E-step temperature; ``chunk_size`` tokens per
    slice of the token axis (None: :func:`auto_chunk_size`); ``generator`` draws the initial
    bases (None: torch's global generator). The generator is the one mutable part: the blocks
    of one call draw from it in turn, so pass the same object to all of them. ``interrupt`` is
    called before each chunk's E-step and may raise to stop (the host's Cancel).
    """

    num_bases: int = DEFAULT_NUM_BASES
    iters: int = DEFAULT_EM_ITERS
    tau: float = DEFAULT_TAU
    chunk_size: int | None = None
    generator: torch.Generator | None = field(default=None, compare=False, repr=False)
    interrupt: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def seeded(self, seed: int) -> "EMParams":
        """These parameters with a new CPU generator seeded with ``seed``."""
        return replace(self, generator=torch.Generator().manual_seed(int(seed)))

    def check(self) -> None:
        if self.iters < 1:
            raise ValueError(f"em_iters must be at least 1, got {self.iters}")
        if self.num_bases < 1:
            raise ValueError(f"num_bases must be at least 1, got {self.num_bases}")


def auto_chunk_size(lead: int, num_bases: int, budget_bytes: int = DEFAULT_EM_MEMORY_BYTES) -> int:
    """Tokens per chunk so that ``lead`` (groups x heads) ``[chunk, M]`` fp32 blocks, two of
    them alive at once, fit in ``budget_bytes``. At least 256 tokens."""
    return max(256, budget_bytes // (2 * 4 * max(1, lead) * max(1, num_bases)))


def _blocks(x: Tokens) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def token_chunks(blocks: Tokens, step: int) -> Iterator[torch.Tensor]:
    """Contiguous fp32 chunks of ``step`` tokens of the blocks' concatenation along ``-2``
    (the last one shorter), built from slices, with a copy only of what a chunk holds. A block
    may be a function that makes it: it is called when its tokens are reached, and the block is
    let go once its last chunk is out."""
    blocks = _blocks(blocks)
    pending: list[torch.Tensor] = []
    have = 0
    for b in blocks:
        b = b() if callable(b) else b
        start, T = 0, b.shape[-2]
        while start < T:
            take = min(step - have, T - start)
            pending.append(b[..., start : start + take, :])
            have += take
            start += take
            if have == step:
                yield _joined(pending)
                pending, have = [], 0
    if pending:
        yield _joined(pending)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0].to(torch.float32).contiguous()
    return torch.cat([p.to(torch.float32) for p in parts], dim=-2)


def init_bases(keys: Tokens, params: EMParams = EMParams()) -> torch.Tensor:
    """Random initial bases ``mu ~ Normal(mean_n K, std_n K)``, per head and channel.

    keys: ``[..., T, d]`` (or token blocks). Returns fp32 ``[..., M, d]`` (``M = params.num_bases``).
    The reference draws with ``torch.normal`` on every call; here the standard normal is
    drawn on the CPU from ``params.generator`` so that a seed gives the same bases on any device.
    Mean and (unbiased) std are two fp32 passes over token chunks, so a half-precision
    input is never copied whole.
    """
    blocks = _blocks(keys)
    first = blocks[0]
    T = sum(b.shape[-2] for b in blocks)
    step = _step(T, first, params)
    total = sum(c.sum(dim=-2, keepdim=True) for c in token_chunks(blocks, step))
    mean = total / T
    if T > 1:
        sq = sum(((c - mean) ** 2).sum(dim=-2, keepdim=True) for c in token_chunks(blocks, step))
        std = (sq / (T - 1)).sqrt()
    else:  # a single token has no spread: start every basis on it
        std = torch.zeros_like(mean)
    shape = (*first.shape[:-2], params.num_bases, first.shape[-1])
    noise = torch.randn(shape, generator=params.generator, dtype=torch.float32, device="cpu")
    return mean + std * noise.to(first.device)


def _step(T: int, first: torch.Tensor, params: EMParams) -> int:
    """Tokens per chunk: ``params.chunk_size`` (None: from the budget for ``first``'s leading
    dimensions), at most ``T``."""
    chunk_size = params.chunk_size
    if chunk_size is None:
        chunk_size = auto_chunk_size(first[..., 0, 0].numel(), params.num_bases)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return min(T, int(chunk_size))


def _e_step_chunk(k_chunk: torch.Tensor, mu_normed: torch.Tensor, tau: float) -> torch.Tensor:
    """Responsibilities of one chunk of tokens: softmax over bases. ``[..., c, M]``."""
    logits = torch.matmul(k_chunk, mu_normed.transpose(-1, -2)).div_(tau)
    return torch.softmax(logits, dim=-1)


def em_bases(
    keys: Tokens,
    values: Tokens | None = None,
    params: EMParams = EMParams(),
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Estimate the key bases ``mu`` and the value bases ``V_b`` of REFERENCE §4.

    keys, values: ``[..., T, d]``, or token blocks of it (any float dtype; all arithmetic is fp32).
    Value blocks may be functions that make them (the values of one pass of a long clip, made
    only for the last iteration, one block at a time); their token counts must match the keys'.
    Returns ``(mu, v_bases)``, fp32 ``[..., M, d]``; ``v_bases`` is None without values.

    Each iteration: E-step ``z = softmax_m(K . normalize(mu) / tau)``, column normalisation
    ``zn = z / (sum_n z + 1e-4)``, M-step ``mu = zn^T K``. The value bases come from the
    responsibilities of the last iteration, and the returned ``mu`` is the last,
    unnormalised one, as in the reference.

    ``params.chunk_size`` processes the tokens in slices of that many rows: ``zn^T K`` equals
    ``diag(1 / (colsum + eps)) z^T K``, so only ``[..., chunk, M]`` responsibilities are
    ever alive instead of ``[..., T, M]``. The result matches the unchunked one to fp32
    rounding (only the summation order differs). None picks a chunk from a 32 MiB budget
    (:func:`auto_chunk_size`); a chunk of at least T tokens is the plain unchunked EM.
    """
    params.check()
    key_blocks = _blocks(keys)
    value_blocks = None if values is None else _blocks(values)
    if value_blocks is not None and not any(callable(v) for v in value_blocks) and \
            [v.shape[:-1] for v in value_blocks] != [k.shape[:-1] for k in key_blocks]:
        raise ValueError(f"keys {[tuple(k.shape) for k in key_blocks]} and values "
                         f"{[tuple(v.shape) for v in value_blocks]} differ in tokens")
    T = sum(k.shape[-2] for k in key_blocks)
    step = _step(T, key_blocks[0], params)
    mu = init_bases(key_blocks, replace(params, chunk_size=step)) if init is None else init.float()

    v_bases = None
    for it in range(params.iters):
        want_v = values is not None and it == params.iters - 1
        mu_normed = mu / (mu.norm(dim=-1, keepdim=True) + MU_NORM_EPS)
        colsum = zk = zv = None
        value_chunks = token_chunks(value_blocks, step) if want_v else None
        for kc in token_chunks(key_blocks, step):
            if params.interrupt is not None:
                params.interrupt()
            z = _e_step_chunk(kc, mu_normed, params.tau)
            zt = z.transpose(-1, -2)
            parts = (z.sum(dim=-2), torch.matmul(zt, kc))
            pv = torch.matmul(zt, next(value_chunks)) if want_v else None
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
