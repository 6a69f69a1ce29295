"""The pass machinery of nodes/host/passes.py on plain tensors and functions (no ComfyUI)."""
from __future__ import annotations

import sys

import pytest
import torch

from unit_imports import PACK, load_pack


@pytest.fixture(scope="module")
def passes():
    load_pack()
    return sys.modules[f"{PACK}.nodes.host.passes"]


def test_pass_rows_cut_every_chunk_alike(passes):
    rows = passes.pass_rows(16, 2, 3)  # 2 chunks of 8 frames, passes of 3 + 3 + 2
    assert [r.tolist() for r in rows] == [[0, 1, 2, 8, 9, 10], [3, 4, 5, 11, 12, 13], [6, 7, 14, 15]]
    with pytest.raises(ValueError):
        passes.pass_rows(15, 2, 3)


def test_joined_and_parted_rebuild_the_one_pass_batch(passes):
    x = torch.arange(16.0).view(16, 1)
    parts = [x[r] for r in passes.pass_rows(16, 2, 3)]
    assert torch.equal(passes.joined(parts, 2), x)
    assert all(torch.equal(a, b) for a, b in zip(passes.parted(x, parts, 2), parts))


def test_cut_takes_the_rows_of_per_row_values_only(passes):
    rows = torch.tensor([1, 3])
    value = {"sigmas": torch.arange(4.0), "control": {"input": [torch.ones(4, 2), None]}, "n": 7, "w": torch.ones(3)}
    cut = passes._cut(value, rows, 4)
    assert torch.equal(cut["sigmas"], torch.tensor([1.0, 3.0])) and cut["control"]["input"][0].shape == (2, 2)
    assert cut["control"]["input"][1] is None and cut["n"] == 7 and cut["w"].shape == (3,)


def test_passes_meet_at_every_layer_in_order_and_get_their_own_share(passes):
    """Three passes, two layers: each layer is combined once over all passes' payloads, and Cancel
    is checked at each meeting."""
    checks = []
    sync = passes.LayerSync(check_interrupt=lambda: checks.append(1))
    combined = []

    def combine(payloads):
        combined.append(list(payloads))
        return [sum(payloads) * 10 + p for p in payloads]

    def a_pass(i):
        def run():
            first = sync.meet(("input", 1, 0), combine, i)
            second = sync.meet(("output", 3, 0), combine, first)
            return second
        return run

    out = sync.run([a_pass(i) for i in range(3)])
    assert combined == [[0, 1, 2], [30, 31, 32]] and len(checks) == 2
    assert out == [930 + 30, 930 + 31, 930 + 32]


def test_passes_that_reach_different_layers_are_refused(passes):
    sync = passes.LayerSync(check_interrupt=lambda: None)
    lone = [lambda: sync.meet(("input", 1, 0), lambda p: p, None), lambda: "done"]
    with pytest.raises(passes.PassesOutOfStep):
        sync.run(lone)


def test_cancel_between_layers_unwinds_every_waiting_pass(passes):
    unwound = []

    class Cancelled(Exception):
        pass

    def cancel():
        raise Cancelled

    sync = passes.LayerSync(check_interrupt=cancel)

    def a_pass():
        try:
            sync.meet(("input", 1, 0), lambda p: p, None)
        finally:
            unwound.append(1)

    with pytest.raises(Cancelled):
        sync.run([a_pass, a_pass])
    assert unwound == [1, 1]
