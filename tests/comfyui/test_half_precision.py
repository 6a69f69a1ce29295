"""Half precision end to end: the UNet computing in fp16 and in bf16.

Users run SD1.5/SD2/SDXL in fp16 or bf16 on a GPU. On a CPU ComfyUI keeps half weights but
computes in fp32 (manual cast), which proves nothing, so these tests make the compute dtype half
through ModelPatcher's own ``set_model_compute_dtype`` (every layer casts its weights to it, and
the model's input and conditioning are cast to it), and check that STEM Invert + STEM Reconstruct,
a STEM-patched KSampler and TokenFlow Edit give finite outputs within a measured bound of the
fp32 run:

- the SD2.x-shaped model (fp32 attention precision): 4 frames of 64x64, 3 steps, Invert +
  Reconstruct in one pass and in passes of 2, the KSampler and TokenFlow Edit in passes of 2 (one
  pass gave the same differences);
- the small SDXL-topology model: each job in passes of 1, 2 frames, 2 steps;
- the random SD1.5 checkpoint: Invert + Reconstruct in passes of 1, 2 frames, 1 step (its
  full-width layers take 5-50x longer in fp16 than in fp32 on a CPU, which has no fast fp16
  matrix product or convolution).

The error is relative to the signal, ``||half - fp32|| / ||fp32||`` over the whole output. The
bounds are about 3x the largest error measured here (the README's "Half precision" has every
figure, beside the fp32 reconstruction's own distance from the clip). (The reference's code runs its whole DDIM loop in fp16, latents included; here the
latents stay fp32 between steps, as ComfyUI's samplers keep them, and EM, TokenFlow's
correspondences and the keyframe record are fp32 or upcast: ``stem/em.py``, ``stem/tokenflow.py``.)
"""
import types

import pytest
import torch

import comfy_harness as harness

HALF = [torch.float16, torch.bfloat16]
# family: (frames, steps, pass sizes); 0 = one pass
SHAPES = {"sd2": (4, 3, (0, 2)), "sdxl": (2, 2, (1,)), "sd15": (2, 1, (1,))}
SIDE = 8
# ||half - fp32|| / ||fp32||, about 3x the largest measured (README: "Half precision")
BOUND = {("sd2", torch.float16): 0.015, ("sd2", torch.bfloat16): 0.12, ("sdxl", torch.float16): 0.03,
         ("sdxl", torch.bfloat16): 0.2, ("sd15", torch.float16): 0.01, ("sd15", torch.bfloat16): 0.01}


def _tiny_sd2():
    from test_stem_nodes import tiny_sd2

    return tiny_sd2()


_MEASURED: list[tuple] = []


class _Summary:
    """Adds the measured differences to pytest's summary (the README's table comes from them)."""

    def pytest_terminal_summary(self, terminalreporter):
        for row in _MEASURED:
            terminalreporter.write_line("half precision: " + " ".join(str(x) for x in row))


@pytest.fixture(scope="module")
def half(request, _prompt_runner, sd15_checkpoint, clip_8x64, stem_pack):
    import comfy.model_management

    if not request.config.pluginmanager.has_plugin("stem-half-summary"):
        request.config.pluginmanager.register(_Summary(), "stem-half-summary")
    prompt = harness.clip_and_prompts(sd15_checkpoint, clip_8x64, "a man is playing tennis",
                                      "spider-man is playing tennis", "ugly, blurry")
    r = _prompt_runner.run(prompt)
    mod = lambda name: harness.pack_submodule(stem_pack, name)  # noqa: E731
    g = torch.Generator().manual_seed(7)
    sd2_cond = [[torch.randn(1, 77, 32, generator=g), {}]]
    models = {
        "sd15": (r.get_node_output("1")[0], r.get_node_output("4")[0], r.get_node_output("5")[0],
                 r.get_node_output("6")[0]),
        "sd2": (_tiny_sd2(), sd2_cond, [[torch.randn(1, 77, 32, generator=g), {}]],
                [[torch.randn(1, 77, 32, generator=g), {}]]),
        "sdxl": (harness.random_sdxl(model_channels=32, num_head_channels=16, seed=0),
                 harness.sdxl_conditioning(1), harness.sdxl_conditioning(2), harness.sdxl_conditioning(3)),
    }
    ns = types.SimpleNamespace(
        models=models, latent=torch.randn(8, 4, SIDE, SIDE, generator=g) * 0.8,
        settings=mod("nodes.host.settings"), em=mod("stem.em"), attn=mod("nodes.host.attention_hooks"),
        inv=mod("nodes.host.inversion_run"), tf=mod("nodes.host.tokenflow_run"), plans=mod("nodes.host.plans"),
        fp32={}, measured=_MEASURED,
    )
    yield ns
    comfy.model_management.unload_all_models()


def stem(h, family, dtype, frames_per_pass):
    """The family's model with STEM attention (16 bases), computing in ``dtype``."""
    model = h.models[family][0].clone()
    if dtype != torch.float32:
        model.set_model_compute_dtype(dtype)
    settings = h.settings.AttentionSettings(mode="stem", em=h.em.EMParams(16, 5, 0.01), seed=1,
                                            frames_per_pass=frames_per_pass)
    return h.attn.patched_model(model, settings)


def run(h, family, dtype, job, frames_per_pass):
    """``job``'s output tensors for the family's model computing in ``dtype``."""
    import nodes

    frames, steps, _ = SHAPES[family]
    model = stem(h, family, dtype, frames_per_pass)
    _, source, positive, negative = h.models[family]
    latent = h.latent[:frames]
    if job == "invert+reconstruct":
        inv = h.inv.invert(model, latent, source, steps)
        rec, _ = h.inv.reconstruct(model, inv)
        return {"inverted": inv.latents[-1], "reconstructed": rec}
    if job == "ksampler":
        empty = {"samples": torch.zeros_like(latent)}
        out = nodes.KSampler().sample(model, 3, steps, 7.5, "ddim", "ddim_uniform", positive, negative, empty)[0]
        return {"sampled": out["samples"]}
    key = (family, frames_per_pass)  # the edit's inversion: fp32, made once
    if key not in h.fp32:
        h.fp32[key] = h.inv.invert(stem(h, family, torch.float32, frames_per_pass), latent, source, steps)
    settings = h.tf.TokenFlowSettings(batch_size=frames // 2, keyframes_per_pass=1 if frames_per_pass else 0)
    edited, _ = h.tf.tokenflow_edit(model, h.fp32[key], positive, negative, settings, progress=False)
    return {"edited": edited}


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


CASES = [(family, job, n) for family, (_, _, sizes) in SHAPES.items()
         for job in (("invert+reconstruct",) if family == "sd15" else ("invert+reconstruct", "ksampler", "tokenflow"))
         for n in (sizes if job == "invert+reconstruct" else sizes[-1:])]


@pytest.mark.parametrize("family, job, frames_per_pass", CASES,
                         ids=[f"{f}-{j}-{f'passes of {n}' if n else 'one pass'}" for f, j, n in CASES])
def test_half_precision_stays_finite_and_close_to_fp32(half, family, job, frames_per_pass):
    key = (family, job, frames_per_pass)
    with torch.inference_mode():
        reference = run(half, family, torch.float32, job, frames_per_pass)
        for dtype in HALF:
            got = run(half, family, dtype, job, frames_per_pass)
            bound = BOUND[family, dtype]
            for name, ref in reference.items():
                out = got[name]
                assert out.dtype == torch.float32 and out.shape == ref.shape
                assert torch.isfinite(out).all(), f"{key} {dtype}: {name} is not finite"
                rel = relative(out, ref)
                half.measured.append((family, job, frames_per_pass, str(dtype).split(".")[1], name, f"{rel:.2e}", bound))
                assert 0 < rel <= bound, f"{key} {dtype}: {name} differs from fp32 by {rel:.3g} (relative)"
        if job == "invert+reconstruct":  # for scale: the fp32 reconstruction's distance from the clip
            own = relative(reference["reconstructed"], half.latent[:SHAPES[family][0]])
            half.measured.append((family, "fp32 reconstruction error", frames_per_pass, "", "", f"{own:.2e}", ""))


def test_the_compute_dtype_is_half_in_the_attention_and_the_plan(half, monkeypatch):
    """The layers really compute in half (not fp32 with half weights), and the memory plan counts
    the compute dtype's element size."""
    seen = []
    real = half.attn.stem_attention
    monkeypatch.setattr(half.attn, "stem_attention", lambda q, *a, **kw: seen.append(q.dtype) or real(q, *a, **kw))
    sizes = []
    real_plan = half.plans.plan_passes
    monkeypatch.setattr(half.plans, "plan_passes", lambda call, *a, **kw: sizes.append(call.element_size)
                        or real_plan(call, *a, **kw))
    with torch.inference_mode():
        for dtype in HALF:
            seen.clear()
            half.inv.invert(stem(half, "sd2", dtype, 0), half.latent, half.models["sd2"][1], 1)
            assert seen and set(seen) == {dtype}
    assert sizes == [2, 2]
