"""SDXL: STEM attention, inversion and TokenFlow editing on SDXL's topology.

A UNet built in-process from ComfyUI's own SDXL model classes with SDXL's block layout and
depths (transformer depth 2 and 10 at the two attention levels, 70 self-attentions) but small
widths (32 base channels, 16-channel heads), seeded random weights, and conditioning shaped as
CLIP Text Encode SDXL makes it (2048-wide tokens, a 1280-wide pooled output, size and crop).
Nothing here judges edit quality: that needs real weights.
"""
import types

import pytest
import torch

import comfy_harness as harness
from tokenflow_probe import TokenFlowProbe

STEPS = 2
F = 4  # frames
SIDE = 8  # latent side (64x64 pixels)


def tiny_sdxl(seed=0, prediction="eps"):
    return harness.random_sdxl(model_channels=32, num_head_channels=16, seed=seed, prediction=prediction)


def sdxl_cond(seed, width=64, height=64):
    return harness.sdxl_conditioning(seed, width, height)


@pytest.fixture(scope="module")
def xl(stem_pack):
    import comfy.model_management

    mod = lambda name: harness.pack_submodule(stem_pack, name)  # noqa: E731
    yield types.SimpleNamespace(
        model=tiny_sdxl(), source=sdxl_cond(1), positive=sdxl_cond(2), negative=sdxl_cond(3),
        latent=torch.randn(F, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(4)),
        unet=mod("nodes.host.unet"), pnp=mod("nodes.host.pnp"), attn=mod("nodes.host.attention_hooks"),
        settings=mod("nodes.host.settings"), passes=mod("nodes.host.passes"), inv=mod("nodes.host.inversion_run"),
        tf=mod("nodes.host.tokenflow_run"), hooks=mod("nodes.host.tokenflow_hooks"), attention=mod("stem.attention"),
        em=mod("stem.em"), latents=mod("nodes.host.latents"),
    )
    comfy.model_management.unload_all_models()  # the edits' object patches leave the shared UNet


def patched(xl, attention="stem", seed=1, frames_per_pass=0):
    """The model with STEM Attention Patch's hooks, 16 bases."""
    settings = xl.settings.AttentionSettings(mode=attention, em=xl.em.EMParams(16, 5, 0.01), seed=seed,
                                             frames_per_pass=frames_per_pass)
    return xl.attn.patched_model(xl.model, settings)


def edit(xl, model, inv, progress=False, **kw):
    return xl.tf.tokenflow_edit(model, inv, xl.positive, xl.negative, xl.tf.TokenFlowSettings(**kw), progress=progress)


def model_call(model, positive, negative, x, cfg=2.0):
    """One guided model call (ComfyUI builds SDXL's pooled, size and crop vector from the conds)."""
    return harness.one_guided_call(model, positive, negative, x, cfg)


def test_sdxl_is_accepted_and_its_70_self_attentions_are_found_from_the_module_tree(xl):
    import comfy.supported_models as sm

    assert xl.unet.check_model(xl.model) == "eps"
    assert xl.unet.check_model(tiny_sdxl(prediction="v")) == "v"
    sites = xl.unet.attn1_sites(xl.model)
    assert len(sites) == 70
    per_block = {}
    for block, i, t in sites:
        per_block[(block, i)] = per_block.get((block, i), 0) + 1
    assert per_block == {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
                         **{("output", i): 10 for i in (0, 1, 2)}, **{("output", i): 2 for i in (3, 4, 5)}}
    # still refused: the refiner (another layout) and other families keep their message
    refiner = types.SimpleNamespace(model=types.SimpleNamespace(model_config=sm.SDXLRefiner(dict(sm.SDXLRefiner.unet_config))))
    with pytest.raises(ValueError, match=r"SDXLRefiner models are not supported.*SD1\.x, SD2\.x and SDXL"):
        xl.unet.check_model(refiner)
    sd3 = types.SimpleNamespace(model=types.SimpleNamespace(model_config=sm.SD3(dict(sm.SD3.unet_config))))
    with pytest.raises(ValueError, match="SD3 models are not supported"):
        xl.unet.check_model(sd3)


def test_stem_on_sdxl_equals_stem_attention_on_captured_qkv(xl, monkeypatch):
    """At every one of the 70 layers the patch computes stem.attention on the layer's own q, k, v
    with its heads (2, 4 or 8 here), one group per cond chunk; SDXL's pooled and size
    conditioning goes through ComfyUI's own path."""
    captured = []
    real = xl.attn.stem_attention

    def spy(q, k, v, heads, **kw):
        out = real(q, k, v, heads, **kw)
        captured.append((q.clone(), k.clone(), v.clone(), heads, kw))
        return out

    monkeypatch.setattr(xl.attn, "stem_attention", spy)
    model = patched(xl, seed=7)
    outs = []
    model.set_model_attn1_output_patch(lambda n, eo: outs.append(n.clone()) or n)
    model_call(model, xl.source, xl.negative, xl.latent)
    assert len(captured) == 70 and len(outs) == 70
    assert sorted({c[3] for c in captured}) == [4, 8]  # 64 and 128 channels in 16-channel heads
    unet = xl.model.get_model_object("diffusion_model")
    for i, (block, idx, t) in ((0, ("input", 4, 0)), (-1, ("output", 5, 1))):
        q, k, v, heads, kw = captured[i]
        attn1 = next(x for x in (unet.input_blocks if block == "input" else unet.output_blocks)[idx]
                     if hasattr(x, "transformer_blocks")).transformer_blocks[t].attn1
        assert heads == attn1.heads and kw["num_chunks"] == 2 and q.shape[0] == 2 * F
        em = xl.em.EMParams(16).seeded(kw["em"].generator.initial_seed())
        with torch.inference_mode():
            expected = attn1.to_out(xl.attention.stem_attention(q, k, v, heads, num_chunks=2, em=em))
        harness.assert_fp32_close(outs[i], expected, depth=4)


def test_per_frame_mode_is_the_plain_sdxl_model_and_the_upstream_model_is_untouched(xl):
    before = {k: v.clone() for k, v in xl.model.model.state_dict().items() if k.endswith("attn1.to_k.weight")}
    options = repr(xl.model.model_options)
    per_frame = patched(xl, attention="per-frame")
    assert torch.equal(model_call(per_frame, xl.source, xl.negative, xl.latent),
                       model_call(xl.model, xl.source, xl.negative, xl.latent))
    stem = patched(xl)
    assert not torch.equal(model_call(stem, xl.source, xl.negative, xl.latent),
                           model_call(xl.model, xl.source, xl.negative, xl.latent))
    assert repr(xl.model.model_options) == options and not xl.model.patches
    after = xl.model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("mode", ["stem", "inflated"])
def test_sdxl_in_passes_equals_one_pass(xl, monkeypatch, mode):
    """Passes of 3 + 1 frames (SDXL's pooled and size vector cut with them) meet at all 70
    self-attentions: the same call as one pass, to fp32 rounding."""
    meetings = []
    real = xl.passes.LayerSync.run

    def spy(self, passes, *a):
        checks = []  # a meeting checks for Cancel once
        check = self.check_interrupt
        self.check_interrupt = lambda: checks.append(1) or check()
        out = real(self, passes, *a)
        meetings.append((len(passes), len(checks)))
        return out

    monkeypatch.setattr(xl.passes.LayerSync, "run", spy)
    one = model_call(patched(xl, mode, frames_per_pass=F), xl.source, xl.negative, xl.latent)
    many = model_call(patched(xl, mode, frames_per_pass=3), xl.source, xl.negative, xl.latent)
    assert meetings == [(2, 70)]
    harness.assert_fp32_close(many, one, depth=70, gain=2.0 * (100.0 if mode == "stem" else 1.0))


@pytest.fixture(scope="module")
def xl_inversion(xl):
    model = patched(xl)
    inv = xl.inv.invert(model, xl.latent, xl.source, STEPS)
    return model, inv


def test_stem_invert_and_reconstruct_on_sdxl_keep_its_size_conditioning(xl, xl_inversion):
    model, inv = xl_inversion
    assert inv.latents.shape == (STEPS + 1, F, 4, SIDE, SIDE) and torch.isfinite(inv.latents).all()
    assert inv.settings["model_family"] == "SDXL" and inv.settings["attention"] == "stem"
    assert inv.settings["size_conditioning"] == {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0,
                                                 "target_width": 64, "target_height": 64}
    assert inv.pooled.shape == (1, 1280)
    cond = xl.latents.inversion_conditioning(inv)
    assert cond[0][1]["width"] == 64 and torch.equal(cond[0][1]["pooled_output"], inv.pooled)
    rec, notes = xl.inv.reconstruct(model, inv)
    assert not notes and rec.shape == xl.latent.shape and torch.isfinite(rec).all()


def test_the_pnp_layout_is_the_reference_rule_on_the_module_tree(xl):
    layout = xl.pnp.pnp_layout(xl.model)
    # SDXL's decoder has self-attention in output blocks 0..5; all but the first, first transformer block
    assert layout.attention == frozenset(("output", i, 0) for i in range(1, 6))
    assert layout.features == "diffusion_model.output_blocks.1.0.out_layers"  # diffusers up_blocks[0].resnets[1]
    moved = xl.pnp.pnp_layout(xl.model, [3, 4], 4)
    assert moved.attention == frozenset(("output", i, 0) for i in (3, 4))
    assert moved.features == "diffusion_model.output_blocks.4.0.out_layers"
    with pytest.raises(ValueError, match=r"pnp_attention_blocks: output blocks \[7\] have no self-attention"):
        xl.pnp.pnp_layout(xl.model, [1, 7])
    with pytest.raises(ValueError, match="pnp_feature_block: output block 40"):
        xl.pnp.pnp_layout(xl.model, None, 40)
    assert xl.pnp.parse_blocks("auto") is None and xl.pnp.parse_blocks("1-3, 5") == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="pnp_attention_blocks: 'x' is not"):
        xl.pnp.parse_blocks("x")


def test_tokenflow_on_sdxl_injects_at_the_chosen_layers_only(xl, xl_inversion, monkeypatch, stem_pack):
    """PnP q/k fire at output blocks 1..5 (first transformer block) in the keyframe pass of the
    first int(2 * 0.5) = 1 step, features at output_blocks[1][0] for int(2 * 0.8) = 1 step,
    and nowhere else; a LoRA-style weight patch on the feature module reaches the wrapped
    layers; the edit runs in keyframe passes too."""
    _, inv = xl_inversion
    with monkeypatch.context() as m:
        probe = TokenFlowProbe(m, stem_pack)
        out, trace = edit(xl, xl.model, inv, cfg=7.5, batch_size=2, seed=1)
    assert out.shape == xl.latent.shape and torch.isfinite(out).all()
    KF = xl.hooks.KEYFRAMES
    assert probe.calls("pnp_qk") == {(0, KF): {("output", i, 0): 2 for i in range(1, 6)}}
    feature = "diffusion_model.output_blocks.1.0.out_layers"
    assert trace.layout.features == feature
    feats = probe.calls("pnp_features")
    assert set(feats) == {(0, KF), (0, "propagation")}
    # every self-attention in each keyframe pass
    assert all(len(c) == 70 for (_, kind), c in probe.calls("attn").items() if kind == KF)

    # a weight patch (LoRA-style) on the wrapped feature module changes what it computes
    seen = []
    real = xl.hooks.FeatureInjection.forward
    monkeypatch.setattr(xl.hooks.FeatureInjection, "forward",
                        lambda self, h: seen.append(float(self[3].weight.detach().abs().max())) or real(self, h))
    patched_model = xl.model.clone()
    key = f"{feature}.3.weight"
    weight = xl.model.model_state_dict()[key]
    assert patched_model.add_patches({key: (-weight.clone(),)}, 1.0) == [key]  # W + (-W): the layer's weight is 0
    edit(xl, patched_model, inv, cfg=7.5, batch_size=2, seed=1, steps=1)
    assert seen and max(seen) == 0.0
    seen.clear()
    edit(xl, xl.model, inv, cfg=7.5, batch_size=2, seed=1, steps=1)
    assert seen and min(seen) > 0.0 and key not in xl.model.patches

    # keyframes in passes of one: the same edit to fp32 rounding
    many, t2 = edit(xl, xl.model, inv, cfg=7.5, batch_size=2, seed=1, keyframes_per_pass=1)
    assert t2.plan.passes == 2
    harness.assert_fp32_close(many, out, depth=70 * STEPS, gain=7.5)
