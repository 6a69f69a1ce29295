"""Inputs an older workflow saved under an earlier name (nodes/host/renamed_inputs.py)."""
from __future__ import annotations

import importlib

import pytest

from unit_imports import PACK, load_pack

RENAMED = {"frames_per_pass": "keyframes_per_pass"}


@pytest.fixture(scope="module")
def renamed_inputs():
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.host.renamed_inputs").renamed_inputs


def prompt(**inputs):
    return {"7": {"class_type": "STEMTokenFlowEdit", "inputs": {"cfg": 7.5, **inputs}}}


def test_an_old_literal_value_is_mapped_and_said(renamed_inputs):
    values, notes = renamed_inputs("TokenFlow Edit", RENAMED, prompt(frames_per_pass=3), "7", {})
    assert values == {"keyframes_per_pass": 3}
    (note,) = notes
    assert note.startswith("TokenFlow Edit: this workflow gives keyframes_per_pass under its old name frames_per_pass (3)")


def test_an_old_linked_value_is_mapped(renamed_inputs):
    values, _ = renamed_inputs("TokenFlow Edit", RENAMED, prompt(frames_per_pass=["3", 0]), "7", {"frames_per_pass": 5})
    assert values == {"keyframes_per_pass": 5}


def test_the_current_name_wins_and_a_current_workflow_is_left_alone(renamed_inputs):
    both = prompt(frames_per_pass=3, keyframes_per_pass=2)
    assert renamed_inputs("TokenFlow Edit", RENAMED, both, "7", {}) == ({}, [])
    assert renamed_inputs("TokenFlow Edit", RENAMED, prompt(keyframes_per_pass=2), "7", {}) == ({}, [])
    assert renamed_inputs("TokenFlow Edit", RENAMED, None, None, {}) == ({}, [])


def test_an_unknown_extra_input_is_an_error_that_names_it(renamed_inputs):
    with pytest.raises(TypeError, match="TokenFlow Edit has no input 'frame_count'"):
        renamed_inputs("TokenFlow Edit", RENAMED, prompt(), "7", {"frame_count": 1})
