"""ControlNet hints cut to the frames of a pass (nodes/host/control_hints.py), on stand-in controls."""
from __future__ import annotations

import importlib

import pytest
import torch

from unit_imports import PACK, load_pack


@pytest.fixture(scope="module")
def control_hints():
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.host.control_hints")


# TokenFlow Edit's ControlNet hint selection works on duck-typed control objects, so it is
# checked here without ComfyUI (the ComfyUI tier checks it on a real ControlNet).
class _FakeControl:
    def __init__(self, hint, previous=None):
        self.cond_hint_original = hint
        self.cond_hint = "cached"
        self.previous_controlnet = previous


def test_tokenflow_frame_hints_cut_per_frame_hints_and_put_them_back(control_hints):
    frame_hints = control_hints.frame_hints
    per_frame = torch.arange(8.0).view(8, 1, 1, 1)
    single = torch.ones(1, 1, 1, 1)
    other = torch.zeros(5, 1, 1, 1)
    first = _FakeControl(per_frame)
    chained = _FakeControl(single, previous=first)  # a chain: Apply ControlNet twice
    odd = _FakeControl(other)
    conds = {"positive": [{"control": chained}], "negative": [{"control": chained}, {"other": 1}],
             "source": [{"control": odd}], "empty": None}
    with frame_hints(conds, [1, 6], 8):
        assert first.cond_hint_original.flatten().tolist() == [1.0, 6.0] and first.cond_hint is None
        assert chained.cond_hint_original is single and chained.cond_hint == "cached"
        assert odd.cond_hint_original is other
    assert first.cond_hint_original is per_frame and first.cond_hint is None
    with pytest.raises(RuntimeError), frame_hints(conds, slice(4, 8), 8):
        assert first.cond_hint_original.flatten().tolist() == [4.0, 5.0, 6.0, 7.0]
        raise RuntimeError("a cancelled pass")
    assert first.cond_hint_original is per_frame
    with frame_hints(conds, [0], 1):  # a one-frame clip: a one-image hint is ComfyUI's business
        assert chained.cond_hint_original is single
