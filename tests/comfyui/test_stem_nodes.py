"""STEM Attention Patch, STEM Invert / Reconstruct and TokenFlow Edit inside a real ComfyUI.

A random-weight SD1.5 checkpoint and a generated 8-frame 64x64 clip; few steps, since one
UNet pass over 8 frames costs about a second on 2 cores.
"""
import types

import pytest
import torch

import comfy_harness as harness
from tokenflow_probe import TokenFlowProbe

STEPS = 4  # pnp_attn_t 0.5 -> q/k injection in steps 0, 1; pnp_f_t 0.8 -> features in steps 0, 1, 2


@pytest.fixture(scope="module")
def sd(_prompt_runner, sd15_checkpoint, clip_8x64, stem_pack):
    """Model, CLIP, VAE, the clip's latent and three prompts, produced by ComfyUI's own nodes."""
    prompt = harness.clip_and_prompts(sd15_checkpoint, clip_8x64, "a man is playing tennis", "spider-man is playing tennis",
                                      "ugly, blurry, low res, unrealistic, unaesthetic")
    r = _prompt_runner.run(prompt)
    model, clip, vae = r.get_node_output("1")
    mod = lambda name: harness.pack_submodule(stem_pack, name)  # noqa: E731
    return types.SimpleNamespace(
        model=model, clip=clip, vae=vae, latent=r.get_node_output("3")[0], source=r.get_node_output("4")[0],
        positive=r.get_node_output("5")[0], negative=r.get_node_output("6")[0],
        unet=mod("nodes.host.unet"), pnp=mod("nodes.host.pnp"), patch=mod("nodes.attention_patch"),
        attn=mod("nodes.host.attention_hooks"), settings=mod("nodes.host.settings"), inv=mod("nodes.host.inversion_run"),
        inv_nodes=mod("nodes.inversion_nodes"), tf=mod("nodes.host.tokenflow_run"), guider=mod("nodes.host.tokenflow_guider"),
        hooks=mod("nodes.host.tokenflow_hooks"), sampling=mod("nodes.host.sampling"), node=mod("nodes.tokenflow_edit"),
        attention=mod("stem.attention"), ddim=mod("stem.ddim"), em=mod("stem.em"), inversion=mod("stem.inversion"),
    )


# REFERENCE §5.2 on SD1.5: the residual branch of output_blocks[4][0] (diffusers up_blocks[1].resnets[1])
PNP_FEATURE_MODULE = "diffusion_model.output_blocks.4.0.out_layers"


def stem_settings(sd, attention="stem", num_bases=16, seed=1, grouping="whole clip", frames_per_group=8,
                  frames_per_pass=0):
    return sd.settings.AttentionSettings(mode=attention, em=sd.em.EMParams(num_bases, 5, 0.01), seed=seed,
                                         grouping=grouping, frames_per_group=frames_per_group,
                                         frames_per_pass=frames_per_pass)


def stem_model(sd, **kw):
    """The clip's model with STEM Attention Patch's hooks (16 bases unless said otherwise)."""
    return sd.attn.patched_model(sd.model, stem_settings(sd, **kw))


def edit(sd, model, inv, positive=None, negative=None, **kw):
    """TokenFlow Edit's run on the clip's target and negative prompts (or those given)."""
    return sd.tf.tokenflow_edit(model, inv, sd.positive if positive is None else positive,
                                sd.negative if negative is None else negative, sd.tf.TokenFlowSettings(**kw))


@pytest.fixture(scope="module")
def inversions(sd):
    """A vanilla and a STEM inversion of the clip, each with its reconstruction."""
    out = {}
    for name, model in (("vanilla", sd.model), ("stem", stem_model(sd, num_bases=256))):
        inv = sd.inv.invert(model, sd.latent["samples"], sd.source, STEPS)
        rec, _ = sd.inv.reconstruct(model, inv)
        out[name] = (model, inv, rec)
    return out


def test_attn1_sites_and_pnp_mapping_match_the_host_module_tree(sd):
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    sites = sd.unet.attn1_sites(sd.model)
    assert len(sites) == 16  # SD1.5: 6 encoder, 1 middle, 9 decoder transformer blocks
    decoder = sorted(i for b, i, _ in sites if b == "output")
    assert decoder == list(range(3, 12))
    # REFERENCE §5.2: all decoder self-attentions but the first of the lowest-resolution stage
    layout = sd.pnp.pnp_layout(sd.model)
    assert layout.attention == {("output", i, 0) for i in decoder[1:]} and layout.features == PNP_FEATURE_MODULE
    unet = sd.model.get_model_object("diffusion_model")
    res = unet.output_blocks[4][0]
    assert isinstance(res, ResBlock)
    # diffusers up_blocks[1].resnets[1]: 1280 channels, second resnet of the first attention stage
    assert res.out_layers[-1].out_channels == 1280
    assert sd.model.get_model_object(PNP_FEATURE_MODULE) is res.out_layers


def test_stem_patch_output_equals_stem_attention_on_captured_qkv(sd, monkeypatch):
    """What ComfyUI computes at a layer equals stem.attention on that layer's q, k, v, with the
    layer's heads, one group per cond chunk, and the per-layer seed."""
    captured = []
    real = sd.attn.stem_attention

    def spy(q, k, v, heads, **kw):
        out = real(q, k, v, heads, **kw)
        captured.append((q.clone(), k.clone(), v.clone(), heads, kw, out.clone()))
        return out

    monkeypatch.setattr(sd.attn, "stem_attention", spy)
    model = stem_model(sd, seed=7)
    outs = []
    model.set_model_attn1_output_patch(lambda n, eo: outs.append(n.clone()) or n)
    x = sd.latent["samples"]
    harness_model_call(model, sd.source, sd.negative, x, cfg=2.0)
    assert len(captured) == 16 and len(outs) == 16
    unet = sd.model.get_model_object("diffusion_model")
    attn1 = unet.input_blocks[1][1].transformer_blocks[0].attn1
    q, k, v, heads, kw, _ = captured[0]
    assert heads == attn1.heads == 8 and kw["num_chunks"] == 2 and q.shape[0] == 16
    layer_seed = kw["em"].generator.initial_seed()
    assert kw["precision"] is None and kw["em"].num_bases == 16  # SD1.5 asks for no attention precision
    with torch.inference_mode():
        expected = attn1.to_out(sd.attention.stem_attention(q, k, v, 8, num_chunks=2,
                                                            em=sd.em.EMParams(16).seeded(layer_seed)))
    # the same functions on the same tensors: only the output projection's kernel may differ
    harness.assert_fp32_close(outs[0], expected, depth=4)


def harness_model_call(model, positive, negative, x, cfg):
    """One guided model call through ComfyUI's CFGGuider on latent x (LATENT scale)."""
    return harness.one_guided_call(model, positive, negative, x, cfg)


@pytest.mark.parametrize("layout", [[0], [1], [1, 0], [0, 1], [0, 1, 2]])
def test_stem_patch_handles_every_cond_or_uncond_layout(sd, layout):
    patch = sd.attn.stem_hooks(stem_settings(sd, num_bases=4))[0]
    F, N, heads, d = 4, 6, 2, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(layout) * F, N, heads * d, generator=g) for _ in range(3))
    eo = {"cond_or_uncond": layout, "n_heads": heads, "block": ("input", 1), "block_index": 0,
          "sigmas": torch.tensor([3.0])}
    out = patch(q, k, v, eo)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert torch.equal(out, patch(q, k, v, eo))  # seeded
    # chunks are independent clips: changing the last chunk's keys leaves the others alone
    k2 = k.clone()
    k2[-F:] += 5
    out2 = patch(q, k2, v, eo)
    torch.testing.assert_close(out2[:-F], out[:-F])
    # within a chunk, frames are coupled through the shared bases: frame 0's keys move frame F-1
    k3 = k.clone()
    k3[0] += 5
    assert not torch.allclose(patch(q, k3, v, eo)[F - 1], out[F - 1])


def test_split_frames_are_refused_clearly(sd):
    patch = sd.attn.stem_hooks(stem_settings(sd, num_bases=4))[0]
    q = torch.randn(4, 6, 8)
    eo = {"cond_or_uncond": [0], "n_heads": 2, "block": ("input", 1), "block_index": 0, "context_window": object()}
    with pytest.raises(ValueError, match="split the frames"):
        patch(q, q, q, eo)


def ksample(sd, model, cfg=7.5, seed=3, steps=1):
    """Core KSampler on 4 empty 64x64 latents, called directly (one model in memory); one step
    unless said otherwise: one guided UNet call, which is what the tests compare."""
    import nodes

    latent = {"samples": torch.zeros(4, 4, 8, 8)}
    return nodes.KSampler().sample(model, seed, steps, cfg, "ddim", "ddim_uniform", sd.positive, sd.negative, latent)[0]["samples"]


@pytest.fixture(scope="module")
def plain_ksample(sd):
    """plain_ksample(cfg): ``ksample`` of the plain model, run once per cfg in this module (the
    first time a test asks for it) and compared against by the tests that follow."""
    done = {}

    def get(cfg=7.5):
        if cfg not in done:
            done[cfg] = ksample(sd, sd.model, cfg)
        return done[cfg]

    return get


@pytest.fixture(scope="module")
def plain_edit(sd, inversions, plain_ksample):
    """TokenFlow Edit of the STEM inversion on the plain model (batch_size 4, seed 3, 2 steps), run
    once for the tests that compare against it. The plain model's KSampler output (cfg 7.5) is
    taken before it, so that it is from before this edit ran on the model."""
    plain_ksample(7.5)
    out, _ = edit(sd, sd.model, inversions["stem"][1], batch_size=4, seed=3, steps=2)
    return out


@pytest.fixture(scope="module")
def edit_bs8(sd, inversions):
    """TokenFlow Edit of the STEM inversion on the plain model (batch_size 8, seed 1, 2 steps: PnP
    in the first step), run once for the tests that compare against it, with what it read:
    ``.out`` (the edited latent), ``.trace`` (its RunTrace), ``.latents_read`` (the timesteps of
    the inversion's latents it took, in order) and ``.feature_weights`` (the largest |weight| of
    the PnP feature module's output layer at each of its calls)."""
    inv = inversions["stem"][1]
    latents_read, feature_weights = [], []
    real_latent_at, real_forward = type(inv).latent_at, sd.hooks.FeatureInjection.forward

    def latent_at(self, t):
        latents_read.append(int(t))
        return real_latent_at(self, t)

    def forward(self, h):
        feature_weights.append(self[3].weight.detach().abs().max().item())
        return real_forward(self, h)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(type(inv), "latent_at", latent_at)
        m.setattr(sd.hooks.FeatureInjection, "forward", forward)
        out, trace = edit(sd, sd.model, inv, batch_size=8, seed=1, steps=2)
    return types.SimpleNamespace(out=out, trace=trace, latents_read=latents_read, feature_weights=feature_weights)


@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_stem_patch_under_a_plain_ksampler_is_deterministic(sd, plain_ksample, cfg):
    node = sd.patch.STEMAttentionPatch()
    patched = node.patch(sd.model, "stem", 16, 5, 0.01, 1, "whole clip", 8)[0]
    a = ksample(sd, patched, cfg)
    b = ksample(sd, node.patch(sd.model, "stem", 16, 5, 0.01, 1, "whole clip", 8)[0], cfg)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.allclose(a, plain_ksample(cfg))  # the patch changed the attention


def test_nodes_leave_the_upstream_model_untouched(sd, inversions, plain_ksample, plain_edit):
    """A KSampler on the original MODEL gives bit-identical output before and after our nodes
    ran on it (TokenFlow Edit: the plain_edit fixture, which runs after the KSampler's first run)."""
    before = plain_ksample(7.5)
    sd.inv.reconstruct(inversions["stem"][0], inversions["stem"][1])
    after = ksample(sd, sd.model)
    assert torch.equal(before, after)
    assert not sd.model.model_options.get("transformer_options", {}).get("patches_replace")
    assert not sd.model.object_patches


def test_inversion_shapes_levels_and_reconstruction_error(sd, inversions, capsys):
    x0 = sd.latent["samples"]
    errs = {}
    for name, (_, inv, rec) in inversions.items():
        assert inv.latents.shape == (STEPS + 1, 8, 4, 8, 8) and torch.isfinite(inv.latents).all()
        assert inv.timesteps == [1, 251, 501, 751]
        assert torch.equal(inv.clean, x0.float())
        # the noisiest latent is far from the clean one, and reconstruction comes back close
        assert (inv.noisiest - x0).abs().mean() > 1.0
        errs[name] = (rec - x0).abs().mean().item()
        assert rec.shape == x0.shape and torch.isfinite(rec).all()
        # 4 steps of a random-weight UNet invert roughly; a broken step (sign, level, scaling) lands
        # as far away as the noise itself
        assert errs[name] < 0.4 * (inv.noisiest - x0).abs().mean().item()
    for _, inv, _ in inversions.values():  # cost of the run, recorded with it
        assert inv.settings["seconds"] > 0 and inv.settings["peak_mib"] >= 0 and inv.settings["memory"] == "cpu-rss"
    assert inversions["stem"][1].settings["attention"] == "stem"
    assert inversions["vanilla"][1].settings["attention"] == "per-frame"
    with capsys.disabled():
        print(f"\n  inversion->reconstruction mean |error| over latents ({STEPS} steps): "
              + ", ".join(f"{k} {v:.4g}" for k, v in errs.items()))


# The attention record of a STEM inversion's file, as STEM Invert has written it (its keys and
# their types), and the rest of the settings an inversion keeps.
ATTENTION_RECORD = {"attention": str, "num_bases": int, "em_iters": int, "tau": float, "seed": int, "grouping": str,
                    "frames_per_group": int, "frames_per_pass": int, "memory_profile": str}
RUN_RECORD = {"passes", "memory_estimate_mib", "steps", "prediction", "model_family", "seconds", "peak_mib", "memory"}


def test_inversions_keep_their_saved_settings_format_and_old_files_still_load(sd, inversions, tmp_path):
    """The settings record a STEM inversion writes has the keys and types its files have always had
    (the typed settings' asdict, with the resolved pass size), and a file written in that format
    by an earlier version loads and reconstructs like this version's."""
    model, inv, rec = inversions["stem"]
    assert set(inv.settings) == set(ATTENTION_RECORD) | RUN_RECORD
    assert all(isinstance(inv.settings[k], t) for k, t in ATTENTION_RECORD.items())
    assert inv.settings["frames_per_pass"] == 8 and inv.settings["num_bases"] == 256
    assert sd.settings.AttentionSettings.from_record(inv.settings) == sd.settings.AttentionSettings.of(model).with_pass_size(8)
    assert set(inversions["vanilla"][1].settings) == {"attention", "frames_per_pass"} | RUN_RECORD
    # an earlier version's file: the same latents, its settings as that version wrote them
    old = dict(inv.settings)
    del old["memory_profile"]  # before memory profiles existed
    path = tmp_path / "old.safetensors"
    sd.inversion.save_inversion(sd.inversion.Inversion(inv.latents, inv.timesteps, inv.sigmas, inv.cond, inv.pooled,
                                                       old), path)
    loaded = sd.inversion.load_inversion(path)
    assert loaded.settings == old
    again, notes = sd.inv.reconstruct(model, loaded)
    assert not notes and torch.equal(again, rec)


def test_reconstructing_with_another_attention_says_so(sd, inversions):
    """A STEM inversion run back with the plain model does not return the clip: the node says
    which attention the inversion was made with and what the model has."""
    _, inv, _ = inversions["stem"]
    out = sd.inv_nodes.STEMReconstruct().reconstruct(sd.model, first_step(sd, inv))
    (note,) = out["ui"]["text"]
    assert note.startswith("STEM Reconstruct: the inversion was made with STEM attention (256 bases")
    assert "this model has per-frame attention" in note
    model, inv = inversions["vanilla"][:2]
    assert isinstance(sd.inv_nodes.STEMReconstruct().reconstruct(model, first_step(sd, inv)), tuple)  # nothing to say


def first_step(sd, inv):
    """The inversion's first step on its own, itself a 1-step inversion of the clip (a 1-step
    schedule's one timestep is 1, the first of every schedule): its settings, one step to run."""
    return sd.inversion.Inversion(inv.latents[:2], inv.timesteps[:1], inv.sigmas[:2], inv.cond, inv.pooled,
                                  {**inv.settings, "steps": 1})


def test_an_api_prompt_with_tokenflows_old_input_name_is_mapped(run_prompt, sd15_checkpoint, clip_8x64, caplog):
    """An API-format prompt saved before keyframes_per_pass was named so gives frames_per_pass:
    ComfyUI alone would drop it; the node uses it as keyframes_per_pass and says so."""
    import logging

    graph = edit_graph(sd15_checkpoint, clip_8x64, steps=1)  # one step: the passes of 3 + 1 keyframes run once
    graph["7"]["inputs"]["seed"] = 2  # an inversion of its own: later graphs find none of these nodes cached
    graph["10"]["inputs"].update(batch_size=2, frames_per_pass=3)  # 4 keyframes: passes of 3 + 1
    del graph["12"]
    graph["12"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}}
    with caplog.at_level(logging.INFO, logger="ComfyUI-STEM"):
        r = run_prompt(graph)
    (note,) = r.outputs["10"]["text"]
    assert "gives keyframes_per_pass under its old name frames_per_pass (3)" in note
    assert any("4 keyframes in 2 passes of up to 3" in rec.getMessage() for rec in caplog.records)


def test_inversion_is_deterministic(sd, inversions):
    model, inv, _ = inversions["stem"]
    again = sd.inv.invert(model, sd.latent["samples"], sd.source, STEPS)
    assert torch.equal(again.latents, inv.latents)


def test_tokenflow_pnp_and_propagation_fire_at_reference_blocks_and_steps(sd, inversions, monkeypatch, stem_pack):
    probe = TokenFlowProbe(monkeypatch, stem_pack)
    inv = inversions["stem"][1]
    out, trace = edit(sd, sd.model, inv, cfg=7.5, batch_size=4, seed=1)
    assert out.shape == sd.latent["samples"].shape and torch.isfinite(out).all()
    # three branches in one UNet call per pass, as in the reference
    assert not trace.split_calls and probe.split_calls == 0
    KF, PROP = sd.hooks.KEYFRAMES, sd.hooks.PROPAGATION
    # every pass read its step from its own noise level: a keyframe pass and 2 batches a step
    assert probe.passes == [(s, kind, b) for s in range(STEPS) for kind, b in ((KF, 0), (PROP, 0), (PROP, 1))]
    pnp_blocks = {("output", i, 0) for i in range(4, 12)}
    assert trace.layout.attention == pnp_blocks
    qk = probe.calls("pnp_qk")
    # q/k injection: first int(4 * 0.5) = 2 steps, keyframe pass only, exactly the decoder blocks
    # 4..11, once per edit branch (uncond, cond)
    assert set(qk) == {(0, KF), (1, KF)}
    for counts in qk.values():
        assert counts == {b: 2 for b in pnp_blocks}
    feats = probe.calls("pnp_features")
    # feature injection: first int(4 * 0.8) = 3 steps, in both passes; 2 propagation batches a step
    assert set(feats) == {(s, m) for s in range(3) for m in (KF, PROP)}
    assert all(c["features"] == (2 if m == PROP else 1) for (s, m), c in feats.items())
    # every self-attention runs once per pass: the keyframe pass, and each of the 2 batches
    for hook in ("attn", "out", "norm"):
        counts = probe.calls(hook)
        for step in range(STEPS):
            if hook != "attn":
                assert len(counts[(step, PROP)]) == 16 and set(counts[(step, PROP)].values()) == {2}
            assert len(counts[(step, KF)]) == 16 and set(counts[(step, KF)].values()) == {1}


def test_tokenflow_split_branches_give_the_same_edit(sd, inversions, edit_bs8, monkeypatch, stem_pack):
    """When ComfyUI cannot batch the three branches, the edit redoes the pass source-first and
    the result is the same as the single-call edit (edit_bs8)."""
    inv = inversions["stem"][1]
    a, tr_a = edit_bs8.out, edit_bs8.trace

    class ForcedSplit(sd.tf.RunTrace):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.split_calls = True

    monkeypatch.setattr(sd.tf, "RunTrace", ForcedSplit)
    probe = TokenFlowProbe(monkeypatch, stem_pack)
    b, tr_b = edit(sd, sd.model, inv, batch_size=8, seed=1, steps=2)
    assert not tr_a.split_calls and tr_b.split_calls
    assert probe.split_calls == 2 * 2  # the source branch alone, in each of the 2 passes of each step
    # the UNet runs on batches of 3 and of 1 + 2 chunks: the same sums in another order. Depth:
    # ~100 layers a pass, 2 passes a step, 2 steps; guidance 7.5 scales the difference.
    harness.assert_fp32_close(b, a, depth=400, gain=7.5)


def test_tokenflow_in_row_chunks_is_the_whole_batch_edit_and_keeps_its_feature_block_whole(sd, inversions, edit_bs8,
                                                                                             stem_pack):
    """With every per-frame module computing one row at a time (Cancel's chunks, at a budget that
    cuts even these small batches), the edit is the whole-batch edit (edit_bs8) to fp32 rounding;
    the ResBlock around TokenFlow's feature injection, which reads the batch's branches, stays whole."""
    cancel = harness.pack_submodule(stem_pack, "nodes.host.cancel")
    inv = inversions["stem"][1]
    whole = edit_bs8.out
    rows = cancel.with_row_chunks(sd.model, budget=1)
    chunked, _ = edit(sd, rows, inv, batch_size=8, seed=1, steps=2)
    harness.assert_fp32_close(chunked, whole, depth=100 * 2, gain=7.5)
    built = sd.hooks.build_edit_model(rows)
    assert "diffusion_model.output_blocks.4.0.out_layers" in built.object_patches
    assert "diffusion_model.output_blocks.4.0" not in built.object_patches
    assert type(built.object_patches["diffusion_model.output_blocks.4.1.transformer_blocks.0.ff"]).row_chunk_budget == 1


def test_tokenflow_edit_is_seeded(sd, inversions, plain_edit):
    """The same seed gives the same edit, bit for bit: here again that of plain_edit, which ran
    before this module's other edits."""
    inv = inversions["stem"][1]
    again, _ = edit(sd, sd.model, inv, batch_size=4, seed=3, steps=2)
    assert torch.equal(again, plain_edit)


def test_edit_refuses_bad_inputs_clearly(sd, inversions):
    inv = inversions["stem"][1]
    with pytest.raises(ValueError, match="fewer than batch_size"):
        edit(sd, sd.model, inv, batch_size=16)
    with pytest.raises(ValueError, match="timesteps"):
        edit(sd, sd.model, inv, batch_size=4, steps=3)
    node = sd.node.TokenFlowEdit()
    other = {"samples": sd.latent["samples"] + 1}
    with pytest.raises(ValueError, match="another clip"):
        node.edit(sd.model, inv, sd.positive, sd.negative, 7.5, 0.5, 0.8, 4, 1, source_latent=other)
    small = {"samples": sd.latent["samples"][:, :, :4, :4]}
    with pytest.raises(ValueError, match="shape"):
        sd.inv_nodes.STEMReconstruct().reconstruct(sd.model, inv, source_latent=small)


def test_weight_patches_reach_the_layers_tokenflow_wraps(sd, inversions, edit_bs8, monkeypatch):
    """A LoRA is a weight patch on the MODEL; one on a layer inside the module TokenFlow Edit
    replaces with add_object_patch (output_blocks.4.0.out_layers) is applied during the edit,
    and the upstream model keeps no patch. (The same edit of the plain model, edit_bs8, saw the
    layer's own weight, recorded the same way.)"""
    key = f"{PNP_FEATURE_MODULE}.3.weight"
    weight = sd.model.model_state_dict()[key]
    patched = sd.model.clone()
    assert patched.add_patches({key: (-weight.clone(),)}, 1.0) == [key]  # W + (-W): the layer's weight is 0
    seen = []
    real_forward = sd.hooks.FeatureInjection.forward

    def recording_forward(self, h):
        seen.append(self[3].weight.detach().abs().max().item())
        return real_forward(self, h)

    monkeypatch.setattr(sd.hooks.FeatureInjection, "forward", recording_forward)
    inv = inversions["stem"][1]
    edit(sd, patched, inv, batch_size=8, seed=1, steps=2)
    assert seen and max(seen) == 0.0
    assert edit_bs8.feature_weights and min(edit_bs8.feature_weights) > 0.0 and key not in sd.model.patches


def random_controlnet(sd):
    """An SD1.5-shaped ControlNet built from ComfyUI's own classes, seeded random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    cfg = dict(sd.model.model.model_config.unet_config)
    cfg.pop("out_channels", None)
    cfg.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=torch.device("cpu"))
    net = comfy.cldm.cldm.ControlNet(**cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device(), manual_cast_dtype=None)


def test_tokenflow_passes_get_their_own_frames_controlnet_hints(sd, inversions, monkeypatch):
    """A ControlNet with one hint per frame: every keyframe and propagation pass sees the hints
    of its own frames (ComfyUI alone would hand each pass the first hints of the clip), the
    hint batch is put back afterwards, and the ControlNet changes the edit. One editing step with
    both PnP windows open: the keyframe passes, their redo source-first and the propagation
    passes of a step, as in the first step of a longer edit."""
    import nodes

    inv = inversions["stem"][1]
    F = sd.latent["samples"].shape[0]
    control = random_controlnet(sd)
    # an IMAGE batch in which frame i is flat at (i + 1) / (F + 1), so a hint names its frame
    hint = (torch.arange(1, F + 1, dtype=torch.float32) / (F + 1)).view(F, 1, 1, 1).expand(F, 64, 64, 3).contiguous()
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(sd.positive, sd.negative, control, hint, 1.0, 0.0, 1.0)[:2]
    applied = pos[0][1]["control"]
    original_hint = applied.cond_hint_original

    net = applied.control_model
    real_forward = net.forward
    seen = []

    def recording_forward(x, hint, *args, **kw):
        seen.append([round(v * (F + 1)) - 1 for v in hint[:, 0, 0, 0].tolist()])
        return real_forward(x, hint, *args, **kw)

    monkeypatch.setattr(net, "forward", recording_forward)
    keyframes = []
    real_sample = sd.guider.sample_keyframes

    def recording_sample(*args, **kw):
        kf = real_sample(*args, **kw)
        keyframes.append(kf.tolist())
        return kf

    monkeypatch.setattr(sd.guider, "sample_keyframes", recording_sample)

    def passes_seen():
        passes = []
        for call in seen:  # positive and negative share the ControlNet: one call, the frames twice
            n = len(call)
            frames = next(call[:k] for k in range(1, n + 1) if n % k == 0 and call == call[:k] * (n // k))
            if not passes or passes[-1] != frames:  # a pass redone source-first repeats its frames
                passes.append(frames)
        seen.clear()
        return passes

    one_step = dict(batch_size=4, seed=3, steps=1, pnp_attn_t=1.0, pnp_f_t=1.0)
    out, _ = edit(sd, sd.model, inv, positive=pos, negative=neg, **one_step)
    expected = [frames for kf in keyframes for frames in (kf, [0, 1, 2, 3], [4, 5, 6, 7])]
    assert len(keyframes) == 1 and passes_seen() == expected
    assert applied.cond_hint_original is original_hint
    # keyframes in passes of one: their UNet calls run interleaved, each with its hint
    keyframes.clear()
    split, _ = edit(sd, sd.model, inv, positive=pos, negative=neg, keyframes_per_pass=1, **one_step)
    expected = [frames for kf in keyframes for frames in ([kf[0]], [kf[1]], [0, 1, 2, 3], [4, 5, 6, 7])]
    assert len(keyframes) == 1
    # ComfyUI cannot batch the source (no ControlNet) with the edit branches: the first keyframe
    # passes are redone source-first, both passes again
    expected = expected[:2] + expected
    assert passes_seen() == expected and applied.cond_hint_original is original_hint
    # (measured here: another keyframe draw, or no PnP, moves the edit 30x this tolerance)
    harness.assert_fp32_close(split, out, depth=100, gain=7.5)
    plain, _ = edit(sd, sd.model, inv, **one_step)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


def test_unsupported_model_family_is_refused(sd):
    import comfy.supported_models as sm

    # SDXL is supported (tests/comfyui/test_sdxl.py); SD3 keeps the refusal
    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=sm.SD3(dict(sm.SD3.unet_config)),
                                                             model_type=sd.model.model.model_type))
    with pytest.raises(ValueError, match=r"SD3 models are not supported.*SD1\.x, SD2\.x and SDXL"):
        sd.unet.check_model(fake)


def edit_graph(ckpt, clip, steps=2):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "STEMLoadVideoFrames", "inputs": {"video": clip, "frame_load_cap": 8, "skip_first_frames": 0,
                                                          "select_every_nth": 1, "size": 64, "crop": False}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a man is playing tennis", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "spider-man is playing tennis", "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly, blurry", "clip": ["1", 1]}},
        "7": {"class_type": "STEMAttentionPatch", "inputs": {"model": ["1", 0], "attention": "stem", "num_bases": 256, "em_iters": 5, "tau": 0.01,
                                                            "seed": 1, "grouping": "whole clip", "frames_per_group": 8}},
        "8": {"class_type": "STEMInvert", "inputs": {"model": ["7", 0], "latent": ["3", 0], "conditioning": ["4", 0], "steps": steps}},
        "9": {"class_type": "FreeU", "inputs": {"model": ["1", 0], "b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
        "10": {"class_type": "STEMTokenFlowEdit", "inputs": {"model": ["9", 0], "inversion": ["8", 0], "positive": ["5", 0],
                                                         "negative": ["6", 0], "cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8,
                                                         "batch_size": 4, "seed": 1}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "stem_test/edit"}},
    }


def test_full_edit_graph_runs_in_the_executor_with_progress_and_previews(sd, run_prompt, sd15_checkpoint, clip_8x64, progress_events):
    r = run_prompt(edit_graph(sd15_checkpoint, clip_8x64))
    files = r.output_files("12")
    assert len(files) == 8 and all(f.exists() for f in files)
    ev = progress_events.for_node("8")  # inversion: one UNet pass a step
    assert [e.value for e in ev] == [1, 2] and all(e.total == 2 for e in ev)
    assert all(e.preview is not None for e in ev)
    # the edit: a keyframe pass and 2 batches a step, 6 passes in all; the bar shows 0 of 6
    # before the model loads, moves once a pass, and gets the step's preview after the step
    ev = progress_events.for_node("10")
    assert all(e.total == 6 for e in ev)
    assert [e.value for e in ev] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
    assert [e.preview is not None for e in ev] == [False, False, False, False, True, False, False, False, True]


def test_cancel_stops_an_inversion_promptly(sd, run_prompt, sd15_checkpoint, clip_8x64, progress_events):
    g = edit_graph(sd15_checkpoint, clip_8x64, steps=20)
    g = {k: v for k, v in g.items() if k in {"1", "2", "3", "4", "7", "8"}}
    progress_events.cancel_after(2)
    err = run_prompt(g, expect_error=True)
    assert err.kind == "interrupted"
    assert len(progress_events.for_node("8")) <= 3  # stopped within a step of the press, not after 20


def test_v_prediction_models_invert_and_reconstruct(sd):
    """An SD2.x-style v-prediction model (here the core ModelSamplingDiscrete node on the
    random SD1.5): eps is derived from the model's own parameterisation."""
    import comfy_extras.nodes_model_advanced as adv

    vmodel = adv.ModelSamplingDiscrete().patch(sd.model, "v_prediction", False)[0]
    assert sd.unet.check_model(vmodel) == "v" and sd.unet.check_model(sd.model) == "eps"
    inv = sd.inv.invert(vmodel, sd.latent["samples"], sd.source, 2)
    assert inv.settings["prediction"] == "v"
    assert torch.isfinite(sd.inv.reconstruct(vmodel, inv)[0]).all()
    # the first inversion step by hand, from the UNet's raw v output (REFERENCE §3, stem.ddim)
    ddim = sd.ddim
    base = vmodel.model
    x_vp = base.process_latent_in(sd.latent["samples"].float())
    s0, s1 = inv.sigmas[0].item(), inv.sigmas[1].item()
    abar1 = 1.0 / (1.0 + s1**2)
    with torch.inference_mode():
        raw = base.diffusion_model(x_vp, torch.full((8,), 1.0), context=sd.source[0][0].repeat(8, 1, 1)).float()
    eps = abar1**0.5 * raw + (1 - abar1) ** 0.5 * x_vp  # v = sqrt(a) eps - sqrt(1-a) x0, x_vp = sqrt(a) x0 + sqrt(1-a) eps
    x1 = ddim.ddim_step(ddim.from_vp(x_vp, s0), eps, s0, s1)
    torch.testing.assert_close(inv.latents[1], base.process_latent_out(x1), rtol=1e-3, atol=1e-3)
    x0_model = adv.ModelSamplingDiscrete().patch(sd.model, "x0", False)[0]
    with pytest.raises(ValueError, match="sampling is not supported"):
        sd.unet.check_model(x0_model)


def test_fewer_edit_steps_use_a_subset_of_the_inversion_timesteps(sd, inversions, edit_bs8):
    inv = inversions["stem"][1]  # timesteps 1, 251, 501, 751
    ts, levels = sd.sampling.edit_levels(inv, 2)
    assert ts == [501, 1]
    assert levels == [inv.sigmas[3].item(), inv.sigmas[1].item(), inv.sigmas[0].item()]
    # edit_bs8: an edit of 2 steps, and the inversion latents it took
    seen, out = edit_bs8.latents_read, edit_bs8.out
    assert seen[0] == 501  # the edit starts from the inversion's latent at its own first level
    assert seen[1:] == [501, 1] and torch.isfinite(out).all()


def test_attention_modes_per_frame_is_sd_and_inflated_is_full_attention(sd, plain_ksample, monkeypatch):
    node = sd.patch.STEMAttentionPatch()
    per_frame = node.patch(sd.model, "per-frame", 16, 5, 0.01, 1, "whole clip", 8)[0]
    assert not per_frame.model_options["transformer_options"].get("patches_replace")
    assert sd.settings.AttentionSettings.of(per_frame).mode == "per-frame"
    assert torch.equal(ksample(sd, per_frame, 1.0), plain_ksample(1.0))

    patch = sd.attn.inflated_hooks(stem_settings(sd, attention="inflated"))[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * 4, 6, 16, generator=g) for _ in range(3))
    eo = {"cond_or_uncond": [1, 0], "n_heads": 2, "block": ("input", 1), "block_index": 0}
    torch.testing.assert_close(patch(q, k, v, eo), sd.attention.full_attention(q, k, v, 2, num_chunks=2))
    monkeypatch.setattr(sd.attn, "free_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"inflated attention over 4 frames .* needs about .* GiB .* limit"):
        patch(q, k, v, eo)


def test_inflated_inversion_runs_and_records_its_mode(sd):
    model = sd.patch.STEMAttentionPatch().patch(sd.model, "inflated", 16, 5, 0.01, 1, "whole clip", 8)[0]
    inv = sd.inv.invert(model, sd.latent["samples"], sd.source, 2)
    assert inv.settings["attention"] == "inflated" and torch.isfinite(inv.latents).all()


# --------------------------------------------------------------------------- one DDIM engine


def model_as_eps(model, cond):
    """The model as stem.ddim's eps function, called below the pack's sampler: ComfyUI's own
    ``apply_model`` (input scaling, eps/v conversion) with the model's patches, on the
    conditional branch alone (REFERENCE §3), the noise written out here as (x - D) / sigma."""
    base = model.model
    options = model.model_options["transformer_options"]

    def eps_fn(x, sigma):
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32)
        to = {**options, "cond_or_uncond": [0], "sigmas": s}
        denoised = base.apply_model(x, s, c_crossattn=cond.repeat(x.shape[0], 1, 1), transformer_options=to)
        return (x - denoised) / sigma

    return eps_fn


@pytest.mark.parametrize("mode", ["per-frame", "stem"])
def test_stem_invert_and_reconstruct_are_the_stem_ddim_loops(sd, inversions, mode):
    """What STEM Invert and STEM Reconstruct compute is stem.ddim's loops driven by the model:
    every recorded level, and the reconstruction, over all steps. The nodes add only the
    ComfyUI plumbing (guider, KSAMPLER, latent scaling), so the two agree to fp32 rounding,
    while a 1% error in eps moves the result by ~1e-3 of its scale (tests/stem/test_ddim.py)."""
    model, inv, rec = inversions["vanilla" if mode == "per-frame" else "stem"]
    base, cond = model.model, sd.source[0][0]
    sched = sd.sampling.model_schedule(model, STEPS)
    assert inv.sigmas.tolist() == pytest.approx(sched.inversion_sigmas, rel=1e-12)
    # the levels as a sampler receives them (float32), and reconstruction from the stored latent:
    # STEM's EM (tau 0.01) turns a rounding-level change of its input into a visible one
    up = torch.tensor(sched.inversion_sigmas, dtype=torch.float32).tolist()
    traj = []

    def keep(i, x):  # as STEM Invert stores the trajectory and continues from it
        traj.append(base.process_latent_out(x))
        return base.process_latent_in(traj[-1])

    with torch.inference_mode():
        eps_fn = model_as_eps(model, cond)
        sd.ddim.ddim_invert(base.process_latent_in(sd.latent["samples"].float()), eps_fn, up, keep=keep)
        back = base.process_latent_out(sd.ddim.ddim_sample(base.process_latent_in(inv.noisiest), eps_fn, up[::-1]))
    # depth: ~100 layers a UNet call, STEPS calls
    harness.assert_fp32_close(inv.latents[1:], torch.stack(traj), depth=100 * STEPS)
    harness.assert_fp32_close(rec, back, depth=100 * 2 * STEPS)


# --------------------------------------------------------------------------- attention precision


def tiny_sd2(seed=0):
    """An SD2.x-shaped model from ComfyUI's own SD20 config (linear transformers, 64-channel
    heads, attn_precision fp32), two levels deep, seeded weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = sm.SD20({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 64,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": True, "context_dim": 32, "num_head_channels": 64,
        "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False})
    base = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def test_attention_precision_reaches_every_attention_the_pack_calls(sd, monkeypatch):
    """SD2.x configs ask for fp32 attention (fp16 SD2.1 without it gives NaN or black frames on
    a GPU): STEM, inflated and TokenFlow's attention all receive it."""
    import comfy.ldm.modules.attention as comfy_attention

    model = tiny_sd2()
    assert model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.attn_precision == torch.float32
    assert sd.unet.check_model(model) in ("eps", "v")
    cond = [[torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)), {}]]
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    seen, captured = [], []
    for name in ("stem_attention", "full_attention"):
        real = getattr(sd.attn, name)
        monkeypatch.setattr(sd.attn, name, lambda *a, _real=real, _name=name, **kw: seen.append((_name, kw["precision"]))
                            or _real(*a, **kw))
    for mode in ("stem", "inflated"):
        patched = sd.attn.patched_model(model, stem_settings(sd, attention=mode, num_bases=4))
        patched.set_model_attn1_output_patch(lambda n, eo: captured.append(eo) or n)
        harness_model_call(patched, cond, cond, x, cfg=1.0)
    sites = len(sd.unet.attn1_sites(model))
    assert seen == [("stem_attention", torch.float32)] * sites + [("full_attention", torch.float32)] * sites

    # TokenFlow's keyframe pass on that model's layer options: the source branch through
    # ComfyUI's attention, the edit branches through stem.tokenflow, all with fp32
    got = []
    real_attention = comfy_attention.optimized_attention
    monkeypatch.setattr(comfy_attention, "optimized_attention",
                        lambda *a, **kw: got.append(("comfy", kw.get("attn_precision"))) or real_attention(*a, **kw))
    real_kf = sd.hooks.keyframe_attention
    monkeypatch.setattr(sd.hooks, "keyframe_attention",
                        lambda *a: got.append(("keyframes", a[5])) or real_kf(*a))
    h = sd.hooks
    ctx = h.PassContext(h.KEYFRAMES, 0, 2, torch.tensor([0, 2]), torch.zeros(2), True, True, False, h.KeyframeRecord())
    eo = {**captured[0], "block": ("output", 5), "block_index": 0, "cond_or_uncond": [h.SOURCE, 1, 0],
          h.CONTEXT_KEY: ctx}
    q = torch.randn(6, 16, 64)
    h.attn_replace(q, q, q, eo)
    assert got == [("comfy", torch.float32), ("keyframes", torch.float32), ("keyframes", torch.float32)]


# --------------------------------------------------------------------------- what a new user met


def test_tokenflow_edit_says_when_it_does_not_use_a_stem_patch(sd, inversions, edit_bs8, caplog):
    """TokenFlow puts its own attention on every layer: a STEM-patched MODEL edits exactly like
    the plain one (edit_bs8, the same settings), and the node says so in the log and on the node."""
    import logging

    inv = inversions["stem"][1]
    node = sd.node.TokenFlowEdit()
    with caplog.at_level(logging.WARNING, logger="ComfyUI-STEM"):
        # passes of 3 frames too: TokenFlow's own passes must not be cut apart by the patch's
        patched = node.edit(stem_model(sd, frames_per_pass=3), inv, sd.positive,
                            sd.negative, 7.5, 0.5, 0.8, 8, 1, steps=2)
    (text,) = patched["ui"]["text"]
    assert "STEM Attention Patch ('stem'), which the edit does not use" in text
    assert any(r.getMessage() == text for r in caplog.records)
    assert torch.equal(patched["result"][0]["samples"], edit_bs8.out)
    # on the plain model the node has nothing to say (the inversion's first step: one step to run)
    assert isinstance(node.edit(sd.model, first_step(sd, inv), sd.positive, sd.negative, 7.5, 0.5, 0.8, 8, 1), tuple)


def test_errors_show_a_type_name_without_a_file_path(run_prompt, sd15_checkpoint, clip_8x64):
    """ComfyUI shows module.QualName; a custom node's module name is its folder's path."""
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a clip", "clip": ["1", 1]}},
        "4": {"class_type": "STEMInvert", "inputs": {"model": ["1", 0], "latent": ["2", 0], "conditioning": ["3", 0], "steps": 2}},
        "5": {"class_type": "STEMTokenFlowEdit", "inputs": {"model": ["1", 0], "inversion": ["4", 0], "positive": ["3", 0],
                                                           "negative": ["3", 0], "cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8,
                                                           "batch_size": 8, "seed": 1}},
    }
    err = run_prompt(prompt, expect_error=True)
    assert err.kind == "execution" and err.node_type == "STEMTokenFlowEdit"
    assert err.exception_type == "ComfyUI-STEM.StemError"
    assert err.exception_message.startswith("batch_size: the clip has 2 frames")
