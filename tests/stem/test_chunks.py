"""stem.chunks: per-frame work in chunks of rows, a check between them."""
import pytest
import torch

from stem.chunks import WORK_PER_CHUNK, in_row_chunks, row_work, rows_per_chunk


def test_row_work_is_channels_squared_times_tokens_for_images_and_token_rows():
    assert row_work(torch.zeros(2, 320, 64, 64)) == 320 * 320 * 4096
    assert row_work(torch.zeros(2, 4096, 320)) == 320 * 320 * 4096
    # the budget: 8 frames of SD1.5's first level at 512x512, 32 at 256x256 or at the next level down
    assert rows_per_chunk(torch.zeros(1, 320, 64, 64)) == 8
    assert rows_per_chunk(torch.zeros(1, 320, 32, 32)) == 32
    assert rows_per_chunk(torch.zeros(1, 640, 32, 32)) == 8
    assert rows_per_chunk(torch.zeros(1, 1280, 128, 128)) == 1  # never fewer than one row
    assert WORK_PER_CHUNK == 8 * 320 * 320 * 4096


@pytest.mark.parametrize("rows, budget, calls", [(10, 3 * 16 * 4, 4), (10, 10 * 16 * 4, 1), (10, 1, 10)])
def test_chunks_give_the_whole_batchs_result_and_check_between_them(rows, budget, calls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, 2, 2, generator=g)  # row work 4 * 4 * 4 = 64
    emb = torch.randn(rows, 3, generator=g)
    weight = torch.randn(4, 1, 1, generator=g)
    seen, checks = [], []

    def fn(xc, e, w, scale=1.0):
        seen.append(xc.shape[0])
        assert e.shape[0] == xc.shape[0] and w is weight  # per-row tensors sliced alike, others as they are
        return xc * w * scale + e.sum(1)[:, None, None, None]  # each row's own arithmetic: exact

    out = in_row_chunks(fn, x, emb, weight, between=lambda: checks.append(1), budget=budget, scale=2.0)
    whole = x * weight * 2.0 + emb.sum(1)[:, None, None, None]
    assert torch.equal(out, whole)
    assert len(seen) == calls and sum(seen) == rows and len(checks) == calls - 1


def test_an_interruption_between_chunks_stops_the_work():
    class Cancelled(Exception):
        pass

    done = []

    def stop():
        raise Cancelled

    with pytest.raises(Cancelled):
        in_row_chunks(lambda xc: done.append(xc.shape[0]) or xc, torch.zeros(6, 4, 2, 2), between=stop, budget=2 * 64)
    assert done == [2]  # the first chunk ran; nothing after the press
