"""Per-frame work in chunks of rows, so that a long call can be interrupted between them.

A UNet's convolutions, ResBlocks and feed-forwards treat each batch row (a frame of a cond chunk)
on its own. Run over a whole clip at once, one of them can take tens of seconds on a CPU, with no
point in between where a Cancel could be noticed. :func:`in_row_chunks` runs such a function on
slices of the batch, bounded by :data:`WORK_PER_CHUNK`, and calls ``between`` after each slice;
since the rows are independent, the result is the function's over the whole batch.

The work of a row is taken as ``channels**2 * tokens`` (a convolution or linear layer over
``tokens`` positions of ``channels`` features; ``[B, C, H, W]`` or ``[B, N, C]``; :func:`row_work`)
or, for an attention of ``tokens`` queries over ``keys`` keys, ``tokens * (keys + channels) *
channels`` (its projections and its scores; :func:`attention_row_work`). The budget is the work of
8 frames of a ResBlock at SD1.5's first level at 512x512 (64 x 64 tokens, 320 channels); the
README's Cancel section has what that takes on a CPU.
"""
from __future__ import annotations

from typing import Callable

import torch

WORK_PER_CHUNK = 8 * 320 * 320 * 64 * 64


def row_work(x: torch.Tensor) -> int:
    """``channels**2 * tokens`` of one batch row of ``x`` (``[B, C, *spatial]`` or ``[B, N, C]``)."""
    if x.dim() == 3:
        tokens, channels = x.shape[1], x.shape[2]
    else:
        channels, tokens = x.shape[1], x[0, 0].numel()
    return max(1, channels * channels * tokens)


def attention_row_work(x: torch.Tensor, context: torch.Tensor | None = None) -> int:
    """``tokens * (keys + channels) * channels`` of one row of an attention over ``x`` ``[B, N, C]``
    (keys: ``context``'s tokens, or ``x``'s own for a self-attention)."""
    tokens, channels = x.shape[1], x.shape[2]
    keys = tokens if context is None else context.shape[1]
    return max(1, tokens * (keys + channels) * channels)


def rows_per_chunk(x: torch.Tensor, budget: int = WORK_PER_CHUNK, work: int | None = None) -> int:
    """Rows of ``x`` a chunk: as many as ``budget`` allows (a row's ``work``, by default
    :func:`row_work`), at least one."""
    return max(1, int(budget) // (row_work(x) if work is None else work))


def _rows_of(a, rows: int) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == rows


def in_row_chunks(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args, between: Callable[[], None] | None = None,
                  budget: int = WORK_PER_CHUNK, work: int | None = None, **kwargs) -> torch.Tensor:
    """``fn(x, *args, **kwargs)`` computed on slices of ``x``'s rows of at most ``budget`` work
    (a row's ``work``, by default :func:`row_work`), ``between()`` after each slice but the last;
    ``args`` and ``kwargs`` that are tensors with ``x``'s batch size are sliced alike, everything
    else is passed as it is. One call where the batch fits one chunk."""
    rows = x.shape[0]
    n = rows_per_chunk(x, budget, work)
    if rows <= n:
        return fn(x, *args, **kwargs)
    out = []
    for start in range(0, rows, n):
        sl = slice(start, start + n)
        out.append(fn(x[sl], *(a[sl] if _rows_of(a, rows) else a for a in args),
                      **{k: v[sl] if _rows_of(v, rows) else v for k, v in kwargs.items()}))
        if between is not None and start + n < rows:
            between()
    return torch.cat(out)
