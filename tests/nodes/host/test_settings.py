"""STEM Attention Patch's typed settings (nodes/host/settings.py), without ComfyUI: the record an
inversion keeps, old records, and what counts as the same attention."""
from __future__ import annotations

import importlib
import json

import pytest

from unit_imports import PACK, load_pack

# An inversion's attention record as STEM Invert has written it since passes existed: the keys
# and types of saved files, which must not change.
SAVED = {"attention": "stem", "num_bases": 256, "em_iters": 5, "tau": 0.01, "seed": 1, "grouping": "whole clip",
         "frames_per_group": 8, "frames_per_pass": 8, "memory_profile": "SD1.x/SD2.x"}


@pytest.fixture(scope="module")
def s():
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.host.settings")


@pytest.fixture(scope="module")
def em():
    return importlib.import_module(f"{PACK}.stem.em")


class FakeModel:
    """What the settings read and write of a ComfyUI ModelPatcher: model_options, clone()."""

    def __init__(self, transformer_options=None):
        self.model_options = {"transformer_options": dict(transformer_options or {})}

    def clone(self):
        return FakeModel(self.model_options["transformer_options"])


def test_the_record_keeps_the_saved_format_and_reads_back(s, em):
    settings = s.AttentionSettings(em=em.EMParams(256, 5, 0.01), frames_per_pass=8)
    assert settings.asdict() == SAVED
    json.dumps(settings.asdict())  # JSON, as the file's metadata holds it
    assert s.AttentionSettings.from_record(SAVED) == settings


def test_older_records_still_read(s):
    """A record without the later keys (memory profile, pass size) reads with their defaults;
    a per-frame inversion's record (no patch on the model) reads as no settings."""
    old = {k: v for k, v in SAVED.items() if k not in ("memory_profile", "frames_per_pass")}
    settings = s.AttentionSettings.from_record(old)
    assert settings.em.num_bases == 256 and settings.frames_per_pass == 0 and settings.profile.name == "SD1.x/SD2.x"
    assert s.AttentionSettings.from_record({"attention": "per-frame", "frames_per_pass": 8}) is None
    xl = s.AttentionSettings.from_record({**SAVED, "memory_profile": "SDXL"})
    assert xl.profile.name == "SDXL"


def test_the_settings_ride_on_a_clone_and_the_model_given_is_left_alone(s):
    model = FakeModel()
    settings = s.AttentionSettings(frames_per_pass=3)
    patched = settings.on(model)
    assert s.AttentionSettings.of(patched) is settings and s.AttentionSettings.of(model) is None
    planned = settings.with_pass_size(4).on(patched)
    assert s.AttentionSettings.of(planned).frames_per_pass == 4 and s.AttentionSettings.of(patched).frames_per_pass == 3
    options = planned.model_options["transformer_options"]
    assert s.AttentionSettings.from_options(options) is s.AttentionSettings.of(planned)


def test_bad_modes_and_groupings_are_refused_by_name(s):
    with pytest.raises(ValueError, match=r"attention: 'full' is not one of"):
        s.AttentionSettings(mode="full")
    with pytest.raises(ValueError, match=r"grouping: 'pairs' is not one of"):
        s.AttentionSettings(grouping="pairs")


def test_what_counts_as_the_same_attention(s, em):
    stem = s.AttentionSettings(em=em.EMParams(64))
    assert s.same_attention(stem, stem.with_pass_size(2))  # passes change how, not what
    assert not s.same_attention(stem, s.AttentionSettings(em=em.EMParams(32)))
    assert not s.same_attention(stem, s.AttentionSettings(em=em.EMParams(64), seed=2))
    assert not s.same_attention(stem, s.AttentionSettings(em=em.EMParams(64), grouping="chunks of n frames"))
    assert not s.same_attention(stem, None)
    assert s.same_attention(None, s.AttentionSettings(mode="per-frame", seed=5))
    inflated = s.AttentionSettings(mode="inflated")
    assert s.same_attention(inflated, s.AttentionSettings(mode="inflated", em=em.EMParams(8), seed=9))
    assert "64 bases" in s.describe(stem) and s.describe(None) == "per-frame attention"


def test_a_layers_em_is_seeded_by_the_run_seed_the_layer_and_the_level(s, em):
    import torch

    settings = s.AttentionSettings(em=em.EMParams(8), seed=3)
    layer = {"block": ("input", 1), "block_index": 0, "sigmas": torch.tensor([2.0])}
    a, b = settings.layer_em(layer), settings.layer_em(layer)
    assert a.num_bases == 8 and a.generator is not b.generator
    assert torch.equal(torch.randn(4, generator=a.generator), torch.randn(4, generator=b.generator))
    other = settings.layer_em({**layer, "block": ("output", 4)})
    assert other.generator.initial_seed() != a.generator.initial_seed()
    assert settings.em.generator is None  # the settings themselves hold no generator state


def test_settings_are_frozen(s):
    settings = s.AttentionSettings()
    with pytest.raises(AttributeError):
        settings.frames_per_pass = 4
