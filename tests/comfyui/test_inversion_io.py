"""Save STEM Inversion and Load STEM Inversion in ComfyUI: round trip, listing, refusals.

Most tests call the node classes directly, with ComfyUI's folder_paths pointed at fresh
temporary folders for each test; the last ones run Load -> Save through ComfyUI's executor
(the conftest's run_prompt) on the session's folders.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import comfy_harness as harness
import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def pack(stem_pack):
    return stem_pack


@pytest.fixture
def inv_mod(pack):
    # the pack's own copy of stem.inversion: the nodes check isinstance against its class
    return harness.pack_submodule(pack, "stem.inversion")


@pytest.fixture
def save_node(pack):
    return pack.NODE_CLASS_MAPPINGS["STEMSaveInversion"]


@pytest.fixture
def load_node(pack):
    return pack.NODE_CLASS_MAPPINGS["STEMLoadInversion"]


@pytest.fixture
def dirs(tmp_path, monkeypatch, pack):
    import folder_paths

    d = {k: tmp_path / k for k in ("input", "output", "temp", "outside")}
    for p in d.values():
        p.mkdir()
    monkeypatch.setattr(folder_paths, "input_directory", str(d["input"]))
    monkeypatch.setattr(folder_paths, "output_directory", str(d["output"]))
    monkeypatch.setattr(folder_paths, "temp_directory", str(d["temp"]))
    return d


def make_inversion(inv_mod, steps=3, frames=2, seed=0, pooled=True):
    g = torch.Generator().manual_seed(seed)
    return inv_mod.Inversion(
        latents=torch.randn(steps + 1, frames, 4, 8, 8, generator=g) * 5,
        timesteps=[1 + 333 * i for i in range(steps)],
        sigmas=torch.linspace(0.03, 14.6, steps + 1, dtype=torch.float64),
        cond=torch.randn(1, 77, 768, generator=g),
        pooled=torch.randn(1, 768, generator=g) if pooled else None,
        settings={"attention": "stem", "num_bases": 16, "seed": seed, "steps": steps, "prediction": "eps",
                  "model_family": "SD15", "tau": 0.01},
    )


def _saved_name(result) -> str:
    assert set(result) == {"ui"} and set(result["ui"]) == {"text"} and len(result["ui"]["text"]) == 1
    return result["ui"]["text"][0]


# --------------------------------------------------------------------------- round trip


def test_save_then_load_returns_exactly_what_was_in_memory(save_node, load_node, inv_mod, dirs):
    inv = make_inversion(inv_mod)

    name = _saved_name(save_node().save(inv, "stem_inversion/clip"))

    assert name == "stem_inversion/clip_00001.safetensors [output]"
    assert (dirs["output"] / "stem_inversion" / "clip_00001.safetensors").is_file()
    assert name in load_node.INPUT_TYPES()["required"]["inversion_file"][0]
    assert load_node.VALIDATE_INPUTS(inversion_file=name) is True
    (back,) = load_node().load(name)
    assert isinstance(back, inv_mod.Inversion)
    assert back.latents.dtype == torch.float32 and torch.equal(back.latents, inv.latents)
    assert back.timesteps == inv.timesteps
    assert torch.equal(back.sigmas, inv.sigmas)
    assert torch.equal(back.cond, inv.cond) and torch.equal(back.pooled, inv.pooled)
    assert back.settings == inv.settings
    meta = inv_mod.read_metadata(dirs["output"] / "stem_inversion" / "clip_00001.safetensors")
    assert meta["frames"] == "2" and meta["steps"] == "3" and meta["latent_shape"] == "[2, 4, 8, 8]"


def test_float16_keeps_latents_close_and_the_rest_exact(save_node, load_node, inv_mod, dirs):
    inv = make_inversion(inv_mod, pooled=False)
    name = _saved_name(save_node().save(inv, "half", dtype="float16"))
    (back,) = load_node().load(name)
    assert back.latents.dtype == torch.float32
    torch.testing.assert_close(back.latents, inv.latents, rtol=1e-3, atol=1e-3)
    assert not torch.equal(back.latents, inv.latents)
    assert torch.equal(back.sigmas, inv.sigmas) and torch.equal(back.cond, inv.cond)
    assert back.pooled is None and back.timesteps == inv.timesteps and back.settings == inv.settings
    full = _saved_name(save_node().save(inv, "full"))
    size = lambda n: (dirs["output"] / n.removesuffix(" [output]")).stat().st_size  # noqa: E731
    assert size(name) < size(full)


def test_each_save_takes_the_next_free_number(save_node, inv_mod, dirs):
    inv = make_inversion(inv_mod)
    names = [_saved_name(save_node().save(inv, "runs/clip")) for _ in range(3)]
    assert names == [f"runs/clip_{i:05}.safetensors [output]" for i in (1, 2, 3)]
    (dirs["output"] / "runs" / "clip_00002.safetensors").unlink()
    (dirs["output"] / "runs" / "clip_00010.safetensors").write_bytes(b"not ours, never overwritten")
    assert _saved_name(save_node().save(inv, "runs/clip")) == "runs/clip_00011.safetensors [output]"
    assert (dirs["output"] / "runs" / "clip_00010.safetensors").read_bytes() == b"not ours, never overwritten"
    assert _saved_name(save_node().save(inv, "runs/clip_b")) == "runs/clip_b_00001.safetensors [output]"


def test_save_refuses_something_that_is_not_an_inversion(save_node, dirs):
    with pytest.raises(ValueError, match="inversion: expected a STEM inversion"):
        save_node().save({"samples": torch.zeros(1)}, "x")


# --------------------------------------------------------------------------- listing


def test_the_list_shows_inversions_in_input_and_output_only(save_node, load_node, inv_mod, dirs):
    inv = make_inversion(inv_mod)
    inv_mod.save_inversion(inv, dirs["input"] / "mine.safetensors")
    (dirs["input"] / "deep").mkdir()
    inv_mod.save_inversion(inv, dirs["input"] / "deep" / "nested.safetensors")
    _saved_name(save_node().save(inv, "stem_inversion/clip"))
    save_file({"w": torch.zeros(2)}, str(dirs["input"] / "lora.safetensors"))
    (dirs["output"] / "notes.safetensors").write_text("text renamed")
    inv_mod.save_inversion(inv, dirs["outside"] / "elsewhere.safetensors")
    os.symlink(dirs["outside"] / "elsewhere.safetensors", dirs["input"] / "escape.safetensors")
    inv_mod.save_inversion(inv, dirs["temp"] / "scratch.safetensors")

    combo = load_node.INPUT_TYPES()["required"]["inversion_file"][0]

    assert combo == ["deep/nested.safetensors", "mine.safetensors", "stem_inversion/clip_00001.safetensors [output]"]
    for name in combo:
        assert load_node().load(name)[0].num_frames == 2


# --------------------------------------------------------------------------- refusals


def test_paths_outside_input_and_output_are_refused(load_node, inv_mod, dirs):
    inv = make_inversion(inv_mod)
    secret = dirs["outside"] / "inv.safetensors"
    inv_mod.save_inversion(inv, secret)  # a valid inversion: only the location is wrong
    inv_mod.save_inversion(inv, dirs["temp"] / "inv.safetensors")
    os.symlink(secret, dirs["input"] / "link.safetensors")
    cases = {
        "parent": "../outside/inv.safetensors",
        "parent from output": "../outside/inv.safetensors [output]",
        "absolute": str(secret),
        "symlink": "link.safetensors",
        "temp folder": "inv.safetensors [temp]",
    }
    for case, name in cases.items():
        message = load_node.VALIDATE_INPUTS(inversion_file=name)
        assert isinstance(message, str) and "outside ComfyUI's input folder or output folder" in message, case
        with pytest.raises(ValueError, match="inversion_file: .* points outside"):
            load_node().load(name)
        assert math.isnan(load_node.IS_CHANGED(inversion_file=name)), case


def test_a_missing_file_is_refused(load_node, dirs):
    message = load_node.VALIDATE_INPUTS(inversion_file="gone.safetensors [output]")
    assert isinstance(message, str) and "was not found" in message
    with pytest.raises(ValueError, match="inversion_file: 'gone.safetensors' was not found|inversion_file: .*not found"):
        load_node().load("gone.safetensors [output]")


def test_a_text_file_named_safetensors_gives_a_clear_error(load_node, inv_mod, dirs):
    (dirs["input"] / "fake.safetensors").write_text("this is not a tensor file\n" * 20)
    message = load_node.VALIDATE_INPUTS(inversion_file="fake.safetensors")
    assert isinstance(message, str) and "is not a readable safetensors file" in message
    with pytest.raises(inv_mod.InversionError, match="^inversion_file: .*not a readable safetensors file"):
        load_node().load("fake.safetensors")


def test_a_safetensors_file_that_is_not_an_inversion_gives_a_clear_error(load_node, inv_mod, dirs):
    save_file({"lora_up.weight": torch.zeros(4, 4)}, str(dirs["input"] / "lora.safetensors"), metadata={"ss": "1"})
    message = load_node.VALIDATE_INPUTS(inversion_file="lora.safetensors")
    assert isinstance(message, str) and "not a STEM inversion" in message
    with pytest.raises(inv_mod.InversionError, match="^inversion_file: .*not a STEM inversion"):
        load_node().load("lora.safetensors")


def test_another_extension_is_refused(load_node, inv_mod, dirs):
    inv_mod.save_inversion(make_inversion(inv_mod), dirs["input"] / "inv.pt")
    message = load_node.VALIDATE_INPUTS(inversion_file="inv.pt")
    assert isinstance(message, str) and "not a .safetensors file" in message
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_node().load("inv.pt")


def test_a_prefix_that_leaves_the_output_folder_is_refused(save_node, inv_mod, dirs):
    inv = make_inversion(inv_mod)
    os.symlink(dirs["outside"], dirs["output"] / "linked")
    for prefix in ("../escape", "a/../../escape", str(dirs["outside"] / "escape"), "/tmp/escape", "linked/escape"):
        with pytest.raises(ValueError, match="filename_prefix: .* points outside ComfyUI's output folder"):
            save_node().save(inv, prefix)
    for prefix in ("", "   ", "stem/..", "."):
        with pytest.raises(ValueError, match="filename_prefix: "):
            save_node().save(inv, prefix)
    assert list(dirs["outside"].iterdir()) == [] and list(dirs["temp"].iterdir()) == []
    assert not list(Path(dirs["output"]).rglob("*.safetensors"))


def test_is_changed_follows_size_and_time_without_reading_the_file(save_node, load_node, inv_mod, dirs):
    """An inversion can be hundreds of MB and IS_CHANGED runs on every queue: size and
    modification time, as core LoadVideo, never a hash of the contents."""
    name = _saved_name(save_node().save(make_inversion(inv_mod, seed=1), "c"))
    path = dirs["output"] / "c_00001.safetensors"
    with harness.forbid_reading(path):
        first = load_node.IS_CHANGED(inversion_file=name)
        assert load_node.IS_CHANGED(inversion_file=name) == first
        os.utime(path, (1_000_000, 1_000_000))
        touched = load_node.IS_CHANGED(inversion_file=name)
    assert touched != first
    inv_mod.save_inversion(make_inversion(inv_mod, steps=4, seed=2), path)  # rewritten: another size
    os.utime(path, (1_000_000, 1_000_000))
    assert load_node.IS_CHANGED(inversion_file=name) != touched


@pytest.mark.parametrize("value", [None, ""])
def test_an_empty_list_is_refused_at_validation(load_node, dirs, value):
    """With no inversion saved yet the combo is empty: refused before anything loads, with the
    way out; a linked name is left to the node."""
    message = load_node.VALIDATE_INPUTS(inversion_file=value)
    assert isinstance(message, str) and message.startswith("inversion_file: no inversion chosen")
    assert "Save STEM Inversion" in message and "press R" in message
    assert load_node.VALIDATE_INPUTS(inversion_file=None, input_types={"inversion_file": "STRING"}) is True


def test_the_executor_refuses_an_empty_inversion_list_before_loading_the_model(run_prompt, sd15_checkpoint):
    """The case a new user met: the checkpoint and CLIP loaded (20 s) before the empty list failed."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
        "2": {"class_type": "STEMLoadInversion", "inputs": {"inversion_file": None}},
        "3": {"class_type": "STEMReconstruct", "inputs": {"model": ["1", 0], "inversion": ["2", 0]}},
    }
    error = run_prompt(prompt, expect_error=True)
    assert error.kind == "validation" and "no inversion chosen" in str(error)


# --------------------------------------------------------------------------- through the executor


def test_the_executor_loads_and_saves_an_inversion(run_prompt, inv_mod):
    import folder_paths

    inv = make_inversion(inv_mod, seed=7)
    source = Path(folder_paths.get_input_directory()) / f"executor_inversion_{os.getpid()}.safetensors"
    inv_mod.save_inversion(inv, source)
    prefix = f"stem_test_{os.getpid()}/roundtrip"
    prompt = {
        "1": {"class_type": "STEMLoadInversion", "inputs": {"inversion_file": source.name}},
        "2": {"class_type": "STEMSaveInversion", "inputs": {"inversion": ["1", 0], "filename_prefix": prefix}},
    }
    result = run_prompt(prompt)
    (name,) = result.outputs["2"]["text"]
    assert name == f"{prefix}_00001.safetensors [output]"
    back = inv_mod.load_inversion(folder_paths.get_annotated_filepath(name))
    assert torch.equal(back.latents, inv.latents) and back.settings == inv.settings


def test_the_executor_refuses_a_bad_inversion_file_and_prefix(run_prompt, inv_mod):
    import folder_paths

    fake = Path(folder_paths.get_input_directory()) / f"fake_{os.getpid()}.safetensors"
    fake.write_text("plain text")
    load = {"class_type": "STEMLoadInversion", "inputs": {"inversion_file": fake.name}}
    save = {"class_type": "STEMSaveInversion", "inputs": {"inversion": ["1", 0], "filename_prefix": "x"}}
    error = run_prompt({"1": load, "2": save}, expect_error=True)
    assert error.kind == "validation" and "not a readable safetensors file" in str(error)

    good = Path(folder_paths.get_input_directory()) / f"good_{os.getpid()}.safetensors"
    inv_mod.save_inversion(make_inversion(inv_mod), good)
    load["inputs"]["inversion_file"] = good.name
    save["inputs"]["filename_prefix"] = "../../escape"
    error = run_prompt({"1": load, "2": save}, expect_error=True)
    assert error.kind == "execution" and error.node_type == "STEMSaveInversion"
    assert "filename_prefix: '../../escape' points outside ComfyUI's output folder" in error.exception_message
