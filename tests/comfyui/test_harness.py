"""Smoke tests of the ComfyUI tier itself: ComfyUI runs here, the random SD1.5 checkpoint loads
as SD1.5, a txt2img prompt runs through ComfyUI's executor, and the pack is loaded."""
import os
import sys

import pytest
import torch

import comfy_harness as H
import folder_paths
import nodes


def txt2img_prompt(ckpt, seed=42, steps=2, batch=2, size=64, prefix="stem_smoke"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red car on a road", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


@pytest.fixture(scope="module")
def txt2img(sd15_checkpoint, _prompt_runner):
    """The smoke prompt, run once for the module on the session's executor, with previews on.
    The loader's outputs are dropped from the kept result: a result that outlives its test holds
    the loaded model, and once the executor's cache lets go of it a later prompt would load a
    second copy (4.3 GB in fp32) next to it."""
    result = _prompt_runner.run(txt2img_prompt(sd15_checkpoint), previews=True)
    del result.node_outputs["1"]
    return result


def test_comfyui_imported_in_cpu_mode(comfy_env):
    import comfy.model_management as mm
    assert os.path.realpath(nodes.__file__) == os.path.realpath(os.path.join(comfy_env.comfyui_path, "nodes.py"))
    assert mm.get_torch_device().type == "cpu"
    assert os.path.realpath(sys.modules["utils"].__path__[0]).startswith(os.path.realpath(comfy_env.comfyui_path))
    for name in ("FreeU", "SaveAnimatedWEBP", "SamplerCustomAdvanced", "KSampler"):
        assert name in nodes.NODE_CLASS_MAPPINGS, name
    assert folder_paths.get_output_directory() == str(comfy_env.output_dir)
    assert folder_paths.get_input_directory() == str(comfy_env.input_dir)
    assert folder_paths.get_temp_directory() == str(comfy_env.temp_dir)


def test_pack_loaded_as_custom_node(stem_pack, comfy_env):
    name = str(comfy_env.custom_nodes_dir / "ComfyUI-STEM").replace(".", "_x_")
    assert stem_pack.__name__ == name and sys.modules[name] is stem_pack
    assert os.path.realpath(stem_pack.__file__) == os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "__init__.py"))
    assert isinstance(stem_pack.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(stem_pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert nodes.LOADED_MODULE_DIRS["ComfyUI-STEM"] == str(comfy_env.custom_nodes_dir / "ComfyUI-STEM")
    # the pack's nodes/ is a subpackage of the pack, never the top-level `nodes`
    sub = H.pack_submodule(stem_pack, "nodes")
    assert sub.__name__ == name + ".nodes" and sub is not nodes
    for node_name, cls in stem_pack.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[node_name] is cls
        assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.ComfyUI-STEM"


def test_checkpoint_loads_as_sd15_eps(txt2img, sd15_checkpoint, run_prompt):
    path = folder_paths.get_full_path("checkpoints", sd15_checkpoint)
    assert path and os.path.getsize(path) > 2.0e9  # fp16, 1.07 G parameters
    loaded = run_prompt(txt2img_prompt(sd15_checkpoint))  # all cached: the model txt2img loaded
    model, clip, vae = loaded.get_node_output("1")
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_type.name == "EPS"
    assert type(model.model).__name__ == "BaseModel"
    assert clip.cond_stage_model.__class__.__name__ == "SD1ClipModel"
    assert vae.latent_channels == 4
    unet = model.model.diffusion_model
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    # conditioning, UNet output (eps) and VAE decode are finite and of sane size
    cond = loaded.get_node_output("2")[0][0][0]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all() and cond.abs().max() < 20
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.inference_mode():
        eps = unet(x, timesteps=torch.tensor([500.0, 999.0]), context=cond.repeat(2, 1, 1))
        img = vae.decode(torch.randn(1, 4, 8, 8, generator=gen))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert 0.05 < eps.std() < 5 and eps.abs().max() < 50
    assert img.shape == (1, 64, 64, 3) and torch.isfinite(img).all() and 0.05 < img.std() < 0.5


def test_txt2img_prompt_runs_and_saves_pngs(txt2img, comfy_env):
    # the loader may come from the session executor's cache (an earlier module loaded the checkpoint)
    assert {"2", "3", "4", "5", "6", "7"} <= txt2img.executed_nodes
    assert "1" in txt2img.executed_nodes | set(txt2img.cached_nodes)
    (latent,) = txt2img.get_node_output("5")
    samples = latent["samples"]
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    (images,) = txt2img.get_node_output("6")
    assert images.shape == (2, 64, 64, 3) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.01  # not a flat image
    files = txt2img.output_files("7")
    assert len(files) == 2
    for f in files:
        assert f.parent == comfy_env.output_dir and f.suffix == ".png" and f.stat().st_size > 0
    from PIL import Image
    assert Image.open(files[0]).size == (64, 64)
    # KSampler reported its 2 steps, each with a latent2rgb preview
    ks = [e for e in txt2img.progress if e.node_id == "5"]
    assert [(e.value, e.total) for e in ks] == [(1, 2), (2, 2)]
    assert all(e.preview is not None and e.preview[0] == "JPEG" for e in ks)
    events = [ev for ev, _ in txt2img.messages]
    assert "progress" in events and "executed" in events


def test_same_prompt_is_cached_then_deterministic(txt2img, sd15_checkpoint, run_prompt):
    first = txt2img.get_node_output("5")[0]["samples"]
    # the shared executor caches like a ComfyUI server: an identical prompt runs nothing
    again = run_prompt(txt2img_prompt(sd15_checkpoint))
    assert again.executed_nodes == set() and set(again.cached_nodes) == set(txt2img_prompt("x"))
    assert torch.equal(again.get_node_output("5")[0]["samples"], first)
    # another seed: only the sampler and what follows it run again, and the latents differ
    other = run_prompt(txt2img_prompt(sd15_checkpoint, seed=43))
    assert other.executed_nodes == {"5", "6", "7"}
    assert not torch.equal(other.get_node_output("5")[0]["samples"], first)
    # the classic cache keeps only the previous prompt's nodes, so seed 42 samples again from
    # scratch (same loaded model): the same latents, bit for bit
    again = run_prompt(txt2img_prompt(sd15_checkpoint))
    assert again.executed_nodes == {"5", "6", "7"}
    assert torch.equal(again.get_node_output("5")[0]["samples"], first)
    # rerun=True: everything but the loader runs again, on the same model object
    rerun = run_prompt(txt2img_prompt(sd15_checkpoint), rerun=True)
    assert rerun.executed_nodes == {"2", "3", "4", "5", "6", "7"}
    assert rerun.get_node_output("1")[0] is again.get_node_output("1")[0]
    assert torch.equal(rerun.get_node_output("5")[0]["samples"], first)


def test_errors_are_reported(sd15_checkpoint, run_prompt):
    bad = txt2img_prompt(sd15_checkpoint)
    bad["4"]["inputs"]["width"] = 7  # below EmptyLatentImage's minimum of 16
    err = run_prompt(bad, expect_error=True)
    assert err.kind == "validation" and "width" in str(err) and "node 4" in str(err)
    with pytest.raises(H.PromptError, match="EmptyLatentImage"):
        run_prompt(bad)

    # an exception inside a node: node id, type and ComfyUI's traceback come through.
    # (SD3's 16-channel latent into SD1.5's 4-channel VAE passes validation: both are LATENT)
    broken = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
        "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    err = run_prompt(broken, expect_error=True)
    assert err.kind == "execution" and err.node_id == "3" and err.node_type == "VAEDecode"
    assert err.exception_type and err.traceback and "VAEDecode" in str(err) and "Traceback" in str(err)
    fixed = dict(broken, **{"2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}})
    with pytest.raises(AssertionError, match="expected to fail"):
        run_prompt(fixed, expect_error=True)


def test_cancel_interrupts_a_run(sd15_checkpoint, run_prompt, progress_events):
    progress_events.cancel_after(1)
    err = run_prompt(txt2img_prompt(sd15_checkpoint, seed=7, steps=3), expect_error=True)
    assert err.kind == "interrupted" and err.node_id == "5"
    assert len(progress_events.for_node("5")) == 1 and progress_events.previews


def test_video_clip_fixture(clip_8x64, comfy_env, make_clip):
    import cv2
    path = comfy_env.input_dir / clip_8x64
    assert folder_paths.get_annotated_filepath(clip_8x64) == str(path)
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
    assert not (frames[0] == frames[-1]).all()  # things move
    src = H.synth_frames(8, 64, 64)
    dec0 = cv2.cvtColor(frames[0], cv2.COLOR_BGR2RGB).astype(float)
    assert abs(dec0 - src[0]).mean() < 12  # mp4v is lossy, but it is the same picture
    name = make_clip("other_12x96x80.mp4", frames=12, width=96, height=80)
    cap = cv2.VideoCapture(str(comfy_env.input_dir / name))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (96, 80)
    cap.release()


def test_fresh_runs_on_an_empty_cache(run_prompt):
    # (last in this file: a prompt without the checkpoint loader makes the cache drop the model)
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "2": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 2.0}}}
    a = run_prompt(prompt)  # no output node: the harness adds a PreviewAny sink on node 2
    assert set(a.outputs) == {"sink_2"} and a.get_node_output("2")[0]["samples"].shape == (1, 4, 16, 16)
    assert run_prompt(prompt).executed_nodes == set()
    assert run_prompt(prompt, fresh=True).executed_nodes == {"1", "2", "sink_2"}
    err = run_prompt(prompt, auto_sink=False, expect_error=True)
    assert err.kind == "validation" and "Prompt has no outputs" in str(err)
