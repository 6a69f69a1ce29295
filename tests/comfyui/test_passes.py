"""Clips in passes: every UNet call of a STEM-patched model runs over at most
frames_per_pass frames at a time while attention spans the whole clip; the run's memory is
planned before its first UNet call; Cancel stops inside a step.

A random-weight SD1.5 checkpoint and a generated 8-frame 64x64 clip.
"""
import types

import pytest

import comfy_harness as harness
from tokenflow_probe import TokenFlowProbe

STEPS = 2


@pytest.fixture(scope="module")
def sd(_prompt_runner, sd15_checkpoint, clip_8x64, stem_pack):
    prompt = harness.clip_and_prompts(sd15_checkpoint, clip_8x64, "a man is playing tennis", "ugly, blurry")
    r = _prompt_runner.run(prompt)
    mod = lambda name: harness.pack_submodule(stem_pack, name)  # noqa: E731
    return types.SimpleNamespace(
        model=r.get_node_output("1")[0], latent=r.get_node_output("3")[0]["samples"], source=r.get_node_output("4")[0],
        negative=r.get_node_output("5")[0], node=mod("nodes.attention_patch").STEMAttentionPatch(),
        inv=mod("nodes.host.inversion_run"), plans=mod("nodes.host.plans"), passes=mod("nodes.host.passes"),
        tf=mod("nodes.host.tokenflow_run"), attn=mod("nodes.host.attention_hooks"), memory=mod("nodes.host.memory"),
        stem_memory=mod("stem.memory"), allocator=mod("stem.allocator"), cancel=mod("nodes.host.cancel"),
    )


def patched(sd, mode="stem", frames_per_pass=0, grouping="whole clip"):
    return sd.node.patch(sd.model, mode, 16, 5, 0.01, 1, grouping, 4, frames_per_pass)[0]


def count_meetings(monkeypatch, sd):
    """``(passes, meetings)`` of every run of passes (a meeting checks for Cancel once)."""
    seen = []
    real = sd.passes.LayerSync.run

    def spy(self, passes, *args):
        checks = []
        check = self.check_interrupt
        self.check_interrupt = lambda: checks.append(1) or check()
        out = real(self, passes, *args)
        seen.append((len(passes), len(checks)))
        return out

    monkeypatch.setattr(sd.passes.LayerSync, "run", spy)
    return seen


MODES = [("stem", "whole clip"), ("inflated", "whole clip"), ("per-frame", "whole clip"), ("stem", "chunks of n frames"),
         ("sparse-causal", "whole clip")]


def gain(mode: str) -> float:
    """STEM's E-step divides its logits by tau (0.01): a rounding change in a layer's keys moves
    the responsibilities, and so the output, by up to 1/tau times as much."""
    return 100.0 if mode == "stem" else 1.0


@pytest.fixture(scope="module")
def one_pass_step(sd):
    """one_pass_step(mode, grouping): a 1-step inversion of the clip in one pass of 8 frames, and
    the meetings of passes during it (count_meetings); made once per attention mode and
    grouping, for both pass sizes that are compared with it."""
    done = {}

    def get(mode, grouping):
        if (mode, grouping) not in done:
            with pytest.MonkeyPatch.context() as m:
                seen = count_meetings(m, sd)
                done[mode, grouping] = (sd.inv.invert(patched(sd, mode, 8, grouping), sd.latent, sd.source, 1), seen)
        return done[mode, grouping]

    return get


@pytest.mark.parametrize("frames_per_pass,passes", [(4, 2), (3, 3)])
@pytest.mark.parametrize("mode,grouping", MODES)
def test_an_inversion_step_in_passes_equals_the_one_pass_step(sd, one_pass_step, monkeypatch, mode, grouping,
                                                              frames_per_pass, passes):
    """Passes of 4 + 4 or 3 + 3 + 2 frames against one pass of 8. The UNet's convolutions and
    matrix products then run on batches of another size, whose kernels may round differently
    (on our 2-core CPU passes of 4 gave the same bits, passes of 3 did not), so one step is
    compared, to fp32 rounding: over several steps STEM's EM turns any rounding change into a
    visible one, as it does for a change of thread count. For STEM and inflated the passes met
    at all 16 self-attentions of the call."""
    one, one_meetings = one_pass_step(mode, grouping)
    assert not one_meetings and one.settings["passes"] == 1
    seen = count_meetings(monkeypatch, sd)
    many = sd.inv.invert(patched(sd, mode, frames_per_pass, grouping), sd.latent, sd.source, 1)
    assert (many.settings["frames_per_pass"], many.settings["passes"]) == (frames_per_pass, passes)
    assert seen == ([(passes, 16)] if mode != "per-frame" else [])  # per-frame: nothing to meet for
    harness.assert_fp32_close(many.latents, one.latents, depth=100, gain=gain(mode))


def test_a_guided_ksampler_in_passes_equals_one_pass(sd):
    """Both cond chunks (CFG) are cut alike; the EM of each chunk spans its 8 frames. One step
    of a plain KSampler; guidance 2 scales the rounding of the two chunks' difference."""
    import nodes

    def sample(model):
        latent = {"samples": sd.latent.clone()}
        return nodes.KSampler().sample(model, 3, 1, 2.0, "ddim", "ddim_uniform", sd.source, sd.negative, latent,
                                       denoise=0.6)[0]["samples"]

    harness.assert_fp32_close(sample(patched(sd, "stem", 3)), sample(patched(sd, "stem", 8)), depth=100,
                              gain=2.0 * gain("stem"))


def test_the_run_plan_is_logged_recorded_and_refused_when_nothing_fits(sd, monkeypatch, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="ComfyUI-STEM"):
        inv = sd.inv.invert(patched(sd, "stem", 0), sd.latent, sd.source, 1)
    assert inv.settings["frames_per_pass"] == 8 and inv.settings["passes"] == 1  # auto: the clip fits
    assert inv.settings["memory_estimate_mib"] > 0
    assert any("STEM Invert: 8 frames in 1 pass of up to 8" in r.getMessage() for r in caplog.records)

    # free memory for 3 frames a pass but not 8: auto picks 3 (the estimate is linear in n)
    plans_free = sd.stem_memory.plan_passes(sd.stem_memory.CallShape(8, 64), None, 3)[0].estimated_bytes / 0.8 + 1
    monkeypatch.setattr(sd.plans, "free_memory", lambda device=None: plans_free)
    inv = sd.inv.invert(patched(sd, "stem", 0), sd.latent, sd.source, 1)
    assert (inv.settings["frames_per_pass"], inv.settings["passes"]) == (3, 3)
    with pytest.raises(ValueError, match=r"frames_per_pass 8 means 8 frames in 1 pass .* would not fit: .* GiB is free"
                                         r".* Set frames_per_pass to 0 \(auto\) or at most 3"):
        sd.inv.invert(patched(sd, "stem", 8), sd.latent, sd.source, 1)
    monkeypatch.setattr(sd.plans, "free_memory", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"STEM Invert: even 8 frames in 8 passes of up to 1, about .* GiB above the "
                                         r"model would not fit: .* Use fewer frames"):
        sd.inv.invert(patched(sd, "stem", 0), sd.latent, sd.source, 1)
    with pytest.raises(ValueError, match=r"STEM Invert: 8 frames in 1 pass .* would not fit: .* Put STEM Attention Patch"):
        sd.inv.invert(sd.model, sd.latent, sd.source, 1)  # no patch: no passes


@pytest.mark.parametrize("growth, meetings", [(0, [0, 3, 6]), (2**40, [])], ids=["every-meeting", "on-growth"])
def test_cancel_stops_inside_a_step_at_the_next_layer(sd, monkeypatch, growth, meetings):
    """Cancel is checked where the passes meet: a press during a UNet call stops it at the next
    self-attention, not at the end of the step. Freed memory goes back to the system at a meeting
    once the resident memory has grown by the hand-back's growth (0: at every meeting; 1 TiB: at
    none, only at the run's end)."""
    import functools

    import comfy.model_management as mm

    monkeypatch.setattr(sd.passes, "HandBack", functools.partial(sd.allocator.HandBack, growth))

    model = patched(sd, "stem", 3)
    calls = []

    def press_cancel_on_the_third_layer(n, extra_options):
        calls.append(extra_options["block"])
        if len(calls) == 3 * 3:  # the third layer, once per pass
            mm.interrupt_current_processing(True)
        return n

    model.set_model_attn1_output_patch(press_cancel_on_the_third_layer)
    returned = []  # where freed memory went back to the system: each meeting, and the run's end
    for module, name in ((sd.passes, "meeting"), (sd.memory, "end")):
        monkeypatch.setattr(module, "return_free_memory", lambda name=name: returned.append((name, len(calls))))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sd.inv.invert(model, sd.latent, sd.source, 4)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 9  # 3 layers x 3 passes of the first step's call, of 4 x 16 x 3
    assert returned == [("meeting", n) for n in meetings] + [("end", 9)]


def test_cancel_ends_a_large_step_within_5_seconds(sd):
    """A press of Cancel from another thread, in the middle of one UNet call over 24 frames at
    512x512 in one pass (minutes a step on this CPU), ends the run within 5 seconds: the pack
    checks between the UNet's blocks, around every attention, between EM's token chunks and
    between the row chunks of every ResBlock, sampler and feed-forward, so the longest stretch
    without a check is one chunk (about 2 s on 2 cores; the README has the measured gaps)."""
    import threading
    import time

    import comfy.model_management as mm
    import torch

    latent = torch.randn(24, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    model = patched(sd, "stem", 24)
    pressed = []

    def press():
        pressed.append(time.perf_counter())
        mm.interrupt_current_processing(True)

    # pressed 3 s after the UNet call began (its first input block done): well inside the call
    timer = threading.Timer(3.0, press)
    started = []

    def start_the_timer(h, transformer_options):
        if not started:
            started.append(time.perf_counter())
            timer.start()
        return h

    model.set_model_input_block_patch(start_the_timer)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sd.inv.invert(model, latent, sd.source, 2)
        stopped = time.perf_counter()
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    assert started and pressed, "the run ended before Cancel was pressed"
    assert stopped - pressed[0] <= 5.0, f"Cancel took {stopped - pressed[0]:.1f} s"


def test_per_frame_modules_run_in_row_chunks_with_a_check_between_and_the_same_result(sd, monkeypatch):
    """ResBlocks, up/downsamplers, feed-forwards and SD's self-attention modules run a large batch
    in chunks of rows with a Cancel check between them (object patches of the run's clone, sharing the modules' state, so
    weight patches keep their keys), and the step is the one-piece step to fp32 rounding (oneDNN
    may round a smaller batch differently; SD's own per-frame attention here, since STEM's EM
    amplifies rounding); the upstream model's modules are left as they were."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    model = patched(sd, "per-frame")
    checks = []
    real = sd.cancel.interrupted
    monkeypatch.setattr(sd.cancel, "interrupted", lambda: checks.append(1) or real())
    latent = sd.latent[:4]
    whole = sd.inv.invert(model, latent, sd.source, 1).latents
    default_checks = len(checks)
    checks.clear()
    rows = sd.cancel.with_row_chunks(model, budget=1)  # one row at a time
    chunked = sd.inv.invert(rows, latent, sd.source, 1).latents
    # SD1.5: 22 ResBlocks, 3 down- and 3 upsamplers, 16 feed-forwards, 16 self-attentions; 4 rows:
    # 3 checks inside each
    per_frame = {k: v for k, v in rows.object_patches.items() if k.startswith("diffusion_model.")}
    assert len(per_frame) == 44 + 16
    assert len(checks) - default_checks == (44 + 16) * 3
    harness.assert_fp32_close(chunked, whole, depth=100)
    first = per_frame["diffusion_model.input_blocks.1.0"]
    original = sd.model.get_model_object("diffusion_model.input_blocks.1.0")  # as the upstream model has it
    assert isinstance(first, ResBlock) and type(first) is not ResBlock and type(original) is ResBlock
    assert dict(first.named_parameters()).keys() == dict(original.named_parameters()).keys()
    assert all(a is b for a, b in zip(first.parameters(), original.parameters()))


def test_stem_passes_meet_before_the_projections(sd, monkeypatch):
    """Passes wait with the layer's input, not its q, k, v: the keys and values of all passes are
    projected once at the meeting, the bases made once a layer, and each pass attends its own
    queries to them."""
    made, attended = [], []
    real_bases, real_attend = sd.attn.stem_bases, sd.attn.attend_shared
    monkeypatch.setattr(sd.attn, "stem_bases", lambda ks, *a, **kw: made.append([k.shape[0] for k in ks])
                        or real_bases(ks, *a, **kw))
    monkeypatch.setattr(sd.attn, "attend_shared", lambda q, *a, **kw: attended.append(q.shape[0])
                        or real_attend(q, *a, **kw))
    sd.inv.invert(patched(sd, "stem", 3), sd.latent, sd.source, 1)
    assert made == [[3, 3, 2]] * 16 and attended == [3, 3, 2] * 16


def edit(sd, inv, keyframes_per_pass):
    settings = sd.tf.TokenFlowSettings(cfg=7.5, batch_size=2, seed=3, steps=STEPS, keyframes_per_pass=keyframes_per_pass)
    return sd.tf.tokenflow_edit(sd.model, inv, sd.source, sd.negative, settings, progress=False)


@pytest.fixture(scope="module")
def one_pass_edit(sd, stem_pack):
    """A per-frame inversion and its TokenFlow edit in one keyframe pass (8 frames in batches of
    2: 4 keyframes a step), with the log lines of the edit and what its hooks did."""
    import logging

    import comfy.model_management

    inv = sd.inv.invert(sd.model, sd.latent, sd.source, STEPS)
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ComfyUI-STEM")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as m:
            probe = TokenFlowProbe(m, stem_pack)
            out, trace = edit(sd, inv, 0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    yield types.SimpleNamespace(inv=inv, out=out, trace=trace, log=lines, probe=probe)
    # ComfyUI leaves the last loaded clone's object patches (TokenFlow's feature module) in the
    # shared UNet until another model loads; unload, so later modules see the model as loaded
    comfy.model_management.unload_all_models()


def test_a_tokenflow_edit_with_keyframes_in_passes_equals_one_pass(sd, one_pass_edit, monkeypatch, stem_pack):
    """With free memory for 3 keyframes a pass but not 4, auto edits the 4 keyframes of each
    step in passes of 3 + 1 that meet at every self-attention, so that their extended
    attention (PnP included) spans all 4: the edit equals the one-pass edit to fp32 rounding."""
    t1 = one_pass_edit.trace
    assert (t1.plan.frames_per_pass, t1.plan.passes) == (4, 1) and t1.plan.estimated_bytes > 0
    assert any("TokenFlow Edit: 4 keyframes in 1 pass of up to 4 and propagation passes of 2 frames, about" in line
               for line in one_pass_edit.log)
    free = keyframe_plan_free(sd, 3)
    monkeypatch.setattr(sd.plans, "free_memory", lambda device=None: free)
    split, whole = TokenFlowProbe(monkeypatch, stem_pack), one_pass_edit.probe
    many, t2 = edit(sd, one_pass_edit.inv, 0)
    assert (t2.plan.frames_per_pass, t2.plan.passes) == (3, 2)
    kinds = lambda p: [(s, k) for s, k, _ in p.passes if k == "keyframes"]  # noqa: E731
    assert kinds(split) == [(s, "keyframes") for s in range(STEPS) for _ in range(2)]
    assert kinds(whole) == [(s, "keyframes") for s in range(STEPS)]
    for hook in ("attn", "pnp_qk", "pnp_features", "out"):  # every hook ran in both keyframe passes
        assert split.calls(hook) == {k: {b: n * 2 for b, n in v.items()} if k[1] == "keyframes" else v
                                     for k, v in whole.calls(hook).items()}, hook
    harness.assert_fp32_close(many, one_pass_edit.out, depth=100, gain=7.5)


def keyframe_plan_free(sd, keyframes_per_pass: int) -> float:
    """Free memory for this clip's edit (4 keyframes in 3 branches, batches of 2, 64 first-level
    tokens a frame) in keyframe passes of ``keyframes_per_pass``, and not one more."""
    keyframes = sd.stem_memory.CallShape(4, 64, rows_per_frame=3)
    return sd.stem_memory.plan_tokenflow(keyframes, 2, None, keyframes_per_pass)[0].estimated_bytes / 0.8 + 1


def test_a_tokenflow_edit_that_cannot_fit_is_refused_with_its_estimate(sd, one_pass_edit, monkeypatch):
    """Refused before the first UNet call, naming the estimate, the free memory and the fix."""
    free = keyframe_plan_free(sd, 1)
    monkeypatch.setattr(sd.plans, "free_memory", lambda device=None: free)
    with pytest.raises(ValueError, match=r"TokenFlow Edit: keyframes_per_pass 4 means 4 keyframes in 1 pass .* about .* "
                                         r"GiB above the model, which would not fit: .* GiB is free.* Set "
                                         r"keyframes_per_pass to 0 \(auto\) or at most 1"):
        edit(sd, one_pass_edit.inv, 4)
    monkeypatch.setattr(sd.plans, "free_memory", lambda device=None: 1000)
    with pytest.raises(ValueError, match=r"TokenFlow Edit: even 4 keyframes in 4 passes of up to 1 .* Use a smaller "
                                         r"batch_size"):
        edit(sd, one_pass_edit.inv, 0)
