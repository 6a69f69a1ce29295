"""FateZero Edit inside a real ComfyUI, on the random-weight SD1.5 checkpoint and a generated
8-frame 64x64 clip: the source branch replays the inversion bit for bit, passes give the same
edit, bad inputs are refused clearly, and the node runs in the executor with progress."""
import types

import pytest
import torch

import comfy_harness as harness

STEPS = 2  # the module's inversion: its tests edit in 1 step (a subset of its timesteps) or refuse
SOURCE = "a man is playing tennis"


@pytest.fixture(scope="module")
def fz(_prompt_runner, sd15_checkpoint, clip_8x64, stem_pack):
    import comfy.model_management

    prompt = harness.clip_and_prompts(sd15_checkpoint, clip_8x64, SOURCE)
    r = _prompt_runner.run(prompt)
    model, clip, vae = r.get_node_output("1")
    mod = lambda name: harness.pack_submodule(stem_pack, name)  # noqa: E731
    yield types.SimpleNamespace(
        model=model, clip=clip, latent=r.get_node_output("3")[0], source=r.get_node_output("4")[0],
        node=stem_pack.NODE_CLASS_MAPPINGS["STEMFateZeroEdit"](), patch=stem_pack.NODE_CLASS_MAPPINGS["STEMAttentionPatch"](),
        invert=stem_pack.NODE_CLASS_MAPPINGS["STEMInvert"](), attn=mod("nodes.host.attention_hooks"),
        run=mod("nodes.host.fatezero_run"), plans=mod("nodes.host.plans"),
    )
    comfy.model_management.unload_all_models()


def stem_inversion(fz, mode="stem", steps=STEPS):
    model = fz.patch.patch(fz.model, mode, 16, 5, 0.01, 1, "whole clip", 8)[0]
    return fz.invert.invert(model, fz.latent, fz.source, steps)[0]


@pytest.fixture(scope="module")
def inv(fz):
    return stem_inversion(fz)


@pytest.fixture(scope="module")
def one_step(fz, inv):
    """The edit of ``inv`` in one step with both windows open, in one pass of the 8 frames: what
    the tests below compare the same step in passes, with FreeU and with a weight patch to."""
    return edit(fz, inv, steps=1, self_replace_steps=1.0, frames_per_pass=8)


def edit(fz, inversion, **kw):
    args = dict(model=fz.model, clip=fz.clip, inversion=inversion, source_prompt=SOURCE,
                target_prompt="a man is playing tennis watercolor", negative_prompt="", controller="refine",
                cross_replace_steps=0.8, self_replace_steps=0.7, cfg=7.5)
    args.update(kw)
    out = fz.node.edit(**args)
    return (out["result"] if isinstance(out, dict) else out)[0]["samples"]


def record_stem_calls(monkeypatch, fz):
    """Every STEM attention call: its EM seed (which names the layer and level), q, k, v, output."""
    calls = []
    real = fz.attn.stem_attention

    def spy(q, k, v, heads, **kw):
        out = real(q, k, v, heads, **kw)
        calls.append((kw["em"].generator.initial_seed(), q.clone(), k.clone(), v.clone(), out.clone()))
        return out

    monkeypatch.setattr(fz.attn, "stem_attention", spy)
    return calls


def test_the_source_branch_replays_the_inversion_bit_for_bit(fz, monkeypatch):
    """The maps FateZero fuses are recomputed, not stored: at every step the source branch runs
    the inversion's UNet call of that level (its stored latent, prompt, STEM seeds). Every STEM
    attention of the inversion recurs in the edit with the same queries, keys, values and output,
    bit for bit (the edit's own attention is seeded apart, seed 2, and the fused calls take the
    target's values)."""
    inverted = record_stem_calls(monkeypatch, fz)
    inversion = stem_inversion(fz, steps=2)  # edit step 0 fuses self-attention, both replace cross-attention
    assert len(inverted) == 16 * 2
    replayed = record_stem_calls(monkeypatch, fz)
    out = edit(fz, inversion, seed=2)
    assert torch.isfinite(out).all()
    by_seed: dict = {}
    for seed, *tensors in replayed:
        by_seed.setdefault(seed, []).append(tensors)
    for seed, q, k, v, o in inverted:
        assert any(torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(o, o2)
                   for q2, k2, v2, o2 in by_seed.get(seed, [])), f"an inversion call (seed {seed}) was not replayed"
    fused = [t for seed, *t in inverted for q2, k2, v2, _ in by_seed[seed]
             if torch.equal(t[0], q2) and torch.equal(t[1], k2) and not torch.equal(t[2], v2)]
    assert fused  # the source's map on the target's values, at the fused layers


def test_fusion_changes_the_edit_and_passes_give_the_same_edit(fz, inv, one_step):
    """Passes of 3 + 3 + 2 frames of each branch meet at every attention layer: the same edit as
    one pass (one_step), to fp32 rounding (STEM's EM amplifies rounding, tau = 0.01); without any
    window the edit is the target prompt's plain sampling from the inverted latent. One step, both
    windows open."""
    one = one_step
    many = edit(fz, inv, steps=1, self_replace_steps=1.0, frames_per_pass=3)
    harness.assert_fp32_close(many, one, depth=100, gain=7.5 * 100)
    plain = edit(fz, inv, steps=1, cross_replace_steps=0.0, self_replace_steps=0.0)
    assert not torch.allclose(plain, one, atol=1e-3)


def test_bad_inputs_are_refused_with_what_to_do(fz, inv):
    import copy

    with pytest.raises(ValueError, match="blend_source_words: 'horse' is not a word of the source prompt"):
        edit(fz, inv, blend_source_words="horse")
    with pytest.raises(ValueError, match="reweight_words: 'ball' is not a word of the target prompt"):
        edit(fz, inv, reweight_words="ball")
    with pytest.raises(ValueError, match=r"controller: a word swap needs prompts of as many words.*use 'refine'"):
        edit(fz, inv, controller="replace", target_prompt="a man is playing tennis in the rain")
    with pytest.raises(ValueError, match="source_prompt: this is not the prompt the clip was inverted with"):
        edit(fz, inv, source_prompt="a woman is playing golf")
    other = copy.copy(inv)
    other.settings = {**inv.settings, "model_family": "SDXL"}
    with pytest.raises(ValueError, match="inversion: it was made with a SDXL model and this is a SD15 model"):
        edit(fz, other)
    with pytest.raises(ValueError, match="blend_latents: name the edited object's words"):
        edit(fz, inv, blend_latents=True)
    with pytest.raises(ValueError, match="steps: 3 editing steps need timesteps"):
        edit(fz, inv, steps=3)
    with pytest.raises(ValueError, match="target_prompt: the prompt is longer than one CLIP window"):
        edit(fz, inv, target_prompt="a man is playing tennis " * 20)


def test_a_run_that_cannot_fit_is_refused_with_its_estimate(fz, inv, monkeypatch):
    monkeypatch.setattr(fz.plans, "free_memory", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"FateZero Edit: even 8 frames of 3 branches in 8 passes of up to 1 each, "
                                         r"about .* GiB above the model would not fit: .* Use fewer frames"):
        edit(fz, inv)


def test_fatezero_composes_with_freeu_and_weight_patches(fz, inv, one_step):
    """FreeU and a LoRA-style weight patch on the editing model reach every branch's UNet call
    (their edits differ from one_step, the plain model's); the upstream model keeps no patch."""
    import comfy_extras.nodes_freelunch as freelunch

    plain = one_step
    freeu = freelunch.FreeU().patch(fz.model, b1=1.2, b2=1.4, s1=0.9, s2=0.2)[0]
    with_freeu = edit(fz, inv, model=freeu, steps=1, self_replace_steps=1.0, frames_per_pass=8)
    key = "diffusion_model.output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    lora = fz.model.clone()
    assert lora.add_patches({key: (fz.model.model_state_dict()[key] * 0.5,)}, 1.0) == [key]
    with_lora = edit(fz, inv, model=lora, steps=1, self_replace_steps=1.0, frames_per_pass=8)
    for out in (with_freeu, with_lora):
        assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)
    assert key not in fz.model.patches and not fz.model.model_options["transformer_options"].get("patches_replace")


def test_a_sparse_causal_inversion_and_edit_as_fatezero_runs_them(fz, monkeypatch):
    """FateZero's own setting: the clip inverted with sparse-causal attention and edited with it,
    a word swap with a blend mask and latent blending."""
    seen = []
    real = fz.attn.sparse_causal_attention
    monkeypatch.setattr(fz.attn, "sparse_causal_attention", lambda *a, **kw: seen.append(a[0].shape[0]) or real(*a, **kw))
    inversion = stem_inversion(fz, mode="sparse-causal", steps=2)
    assert inversion.settings["attention"] == "sparse-causal" and seen
    out = edit(fz, inversion, controller="replace", target_prompt="a dog is playing tennis", attention="sparse-causal",
               blend_source_words="man", blend_target_words="dog", blend_latents=True, blend_threshold=0.3)
    assert torch.isfinite(out).all() and out.shape == fz.latent["samples"].shape


def fatezero_graph(ckpt, clip, steps=2):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "STEMLoadVideoFrames", "inputs": {"video": clip, "frame_load_cap": 8, "skip_first_frames": 0,
                                                              "select_every_nth": 1, "size": 64, "crop": False}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": SOURCE, "clip": ["1", 1]}},
        "5": {"class_type": "STEMAttentionPatch", "inputs": {"model": ["1", 0], "attention": "stem", "num_bases": 16,
                                                             "em_iters": 5, "tau": 0.01, "seed": 3, "grouping": "whole clip",
                                                             "frames_per_group": 8}},
        "6": {"class_type": "STEMInvert", "inputs": {"model": ["5", 0], "latent": ["3", 0], "conditioning": ["4", 0],
                                                     "steps": steps}},
        "7": {"class_type": "STEMFateZeroEdit", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "inversion": ["6", 0], "source_prompt": SOURCE,
            "target_prompt": "a man is playing tennis watercolor", "negative_prompt": "", "controller": "refine",
            "cross_replace_steps": 0.8, "self_replace_steps": 0.7, "cfg": 7.5, "source_latent": ["3", 0]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
    }


def test_the_node_runs_in_the_executor_with_a_bar_per_pass(run_prompt, sd15_checkpoint, clip_8x64, progress_events):
    r = run_prompt(fatezero_graph(sd15_checkpoint, clip_8x64))
    (latent,) = r.get_node_output("7")
    assert latent["samples"].shape == (8, 4, 8, 8) and torch.isfinite(latent["samples"]).all()
    ev = progress_events.for_node("7")
    # 2 steps, each: negative, target and source branches in one pass each; the bar starts at 0
    assert [e.value for e in ev if e.preview is None] == [0, 1, 2, 3, 4, 5, 6] and all(e.total == 6 for e in ev)
    assert any(e.preview is not None for e in ev)  # the step's latent preview
