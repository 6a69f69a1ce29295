"""The inversion container and its safetensors file."""
import json

import pytest
import torch
from safetensors.torch import save_file

from stem.ddim import DDIMSchedule
from stem.inversion import Inversion, InversionError, load_inversion, read_metadata, save_inversion


def make_inversion(steps=5, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sched = DDIMSchedule.create(steps)
    return Inversion(
        latents=torch.randn(steps + 1, frames, 4, 8, 8, generator=g),
        timesteps=list(reversed(sched.timesteps)),
        sigmas=torch.tensor([sched.final_sigma] + list(reversed(sched.sigmas.tolist())), dtype=torch.float64),
        cond=torch.randn(1, 77, 768, generator=g),
        pooled=torch.randn(1, 768, generator=g),
        settings={"attention": "stem", "num_bases": 256, "steps": steps, "model_family": "SD15"},
    )


def test_save_then_load_returns_what_was_in_memory(tmp_path):
    inv = make_inversion()
    path = tmp_path / "inv.safetensors"
    save_inversion(inv, path)
    back = load_inversion(path)
    assert torch.equal(back.latents, inv.latents)
    assert back.timesteps == inv.timesteps
    assert torch.equal(back.sigmas, inv.sigmas)
    assert torch.equal(back.cond, inv.cond) and torch.equal(back.pooled, inv.pooled)
    assert back.settings == inv.settings
    meta = read_metadata(path)
    assert meta["frames"] == "3" and meta["steps"] == "5" and json.loads(meta["latent_shape"]) == [3, 4, 8, 8]


def test_half_precision_file_is_close(tmp_path):
    inv = make_inversion()
    save_inversion(inv, tmp_path / "h.safetensors", dtype=torch.float16)
    back = load_inversion(tmp_path / "h.safetensors")
    assert back.latents.dtype == torch.float32
    torch.testing.assert_close(back.latents, inv.latents, atol=5e-3, rtol=1e-3)


def test_latent_at_and_levels():
    inv = make_inversion(steps=5)
    assert inv.timesteps == [1, 201, 401, 601, 801]
    assert torch.equal(inv.latent_at(401), inv.latents[3])
    assert torch.equal(inv.noisiest, inv.latents[-1]) and torch.equal(inv.clean, inv.latents[0])
    with pytest.raises(InversionError, match="timestep 21 is not in this inversion"):
        inv.latent_at(21)


def test_check_matches_refuses_other_clip_and_size():
    inv = make_inversion()
    inv.check_matches(inv.clean.clone())
    with pytest.raises(InversionError, match="shape"):
        inv.check_matches(torch.zeros(3, 4, 16, 16))
    with pytest.raises(InversionError, match="another clip"):
        inv.check_matches(inv.clean + 1)


def test_inconsistent_inversion_is_refused():
    inv = make_inversion()
    with pytest.raises(InversionError, match="one more latent"):
        Inversion(inv.latents[:-1], inv.timesteps, inv.sigmas)
    with pytest.raises(InversionError, match="steps"):
        Inversion(inv.latents[0], inv.timesteps, inv.sigmas)


def test_files_that_are_not_inversions_are_refused(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(InversionError, match="not a readable safetensors"):
        load_inversion(text)
    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(InversionError, match="not a STEM inversion"):
        load_inversion(other)
    with pytest.raises(InversionError, match="not found"):
        load_inversion(tmp_path / "missing.safetensors")
