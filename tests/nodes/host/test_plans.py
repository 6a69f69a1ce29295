"""The run plans of nodes/host/plans.py with ComfyUI's model and memory management faked: the GPU
branches (the model's weights still to load count against the free memory; half precision halves
the estimate) are exercised without a GPU."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

from unit_imports import PACK, load_pack


@pytest.fixture(scope="module")
def plans():
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.host.plans")


class FakeModel:
    """What the plans read of a ModelPatcher: its device, sizes, dtype and options."""

    def __init__(self, device="cuda:0", dtype=torch.float16, size=4 * 2**30, loaded=2**30, compute=None):
        self.load_device = torch.device(device)
        self.model = types.SimpleNamespace(get_dtype=lambda: dtype)
        self.compute = compute  # a manual-cast (compute) dtype: ModelPatcher's object "manual_cast_dtype"
        self.model_options = {"transformer_options": {}}
        self._size, self._loaded = size, loaded

    def model_size(self):
        return self._size

    def get_model_object(self, name):
        assert name == "manual_cast_dtype"
        return self.compute

    def loaded_size(self):
        return self._loaded


@pytest.fixture
def gpu(plans, monkeypatch):
    """ComfyUI's free-memory query answering for a GPU with 10 GiB free, and SD1.x's profile."""
    from stem.memory import SD1

    asked = []
    monkeypatch.setattr(plans, "free_memory", lambda device=None: asked.append(device) or 10 * 2**30)
    monkeypatch.setattr(plans, "memory_profile", lambda model: SD1)
    return asked


def test_on_a_gpu_the_weights_still_to_load_count_against_the_free_memory(plans, gpu):
    model = FakeModel()
    assert plans._free_for_run(model) == 10 * 2**30 - 3 * 2**30  # 4 GiB model, 1 GiB of it loaded
    assert gpu == [torch.device("cuda:0")]
    assert plans._free_for_run(FakeModel(loaded=8 * 2**30)) == 10 * 2**30  # all loaded: nothing more
    assert plans._free_for_run(FakeModel(device="cpu")) == 10 * 2**30  # the CPU counts RAM as it is


def test_the_plan_uses_the_unets_dtype_and_refuses_with_the_gpus_figures(plans, gpu):
    latent = torch.zeros(40, 4, 64, 64)  # 40 frames at 512x512, cond and uncond
    half = plans.plan_run(FakeModel(dtype=torch.float16), latent, 2, "STEM Invert")
    full = plans.plan_run(FakeModel(dtype=torch.float32, size=8 * 2**30, loaded=8 * 2**30), latent, 2, "STEM Invert")
    assert half.estimated_bytes < 0.6 * full.estimated_bytes  # fp16 activations: half the bytes
    assert half.frames_per_pass == 40  # fits in 80% of 10 - 3 GiB in half precision
    with pytest.raises(ValueError, match=r"STEM Invert: 40 frames in 1 pass of up to 40, about .* GiB above the model "
                                         r"would not fit: 7.00 GiB is free .* Put STEM Attention Patch"):
        plans.plan_run(FakeModel(dtype=torch.float32), latent, 2, "STEM Invert")


def test_the_element_size_is_the_compute_dtypes():
    """Half weights computed in fp32 (ComfyUI's manual cast on a device without fast half) count 4
    bytes a value; fp32 weights computed in half (``set_model_compute_dtype``) count 2."""
    import importlib

    plans = importlib.import_module(f"{PACK}.nodes.host.plans")
    assert plans._element_size(FakeModel(dtype=torch.float16)) == 2
    assert plans._element_size(FakeModel(dtype=torch.float16, compute=torch.float32)) == 4
    assert plans._element_size(FakeModel(dtype=torch.float32, compute=torch.bfloat16)) == 2
    assert plans.compute_dtype(FakeModel(dtype=torch.float32)) == torch.float32
