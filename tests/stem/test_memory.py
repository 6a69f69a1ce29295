"""The memory plan of a UNet call in passes (stem.memory), on its own arithmetic."""
from dataclasses import replace

import pytest

from stem.memory import SD1, SDXL, CallShape, PassPlan, call_bytes, plan_passes, plan_tokenflow, tokenflow_step_bytes

N = 32 * 32  # a 256x256 frame's first-level tokens
CLIP = CallShape(32, N)


def test_the_estimate_grows_with_frames_and_pass_size_and_halves_in_half_precision():
    one = call_bytes(CLIP, 32)
    assert call_bytes(replace(CLIP, frames=64), 64) > one > call_bytes(CLIP, 8) > call_bytes(CLIP, 1) > 0
    assert call_bytes(CLIP, 8) > call_bytes(replace(CLIP, frames=16), 8)  # waiting frames hold memory too
    assert call_bytes(replace(CLIP, rows_per_frame=2), 8) > call_bytes(CLIP, 8)
    assert call_bytes(replace(CLIP, element_size=2), 8) < call_bytes(CLIP, 8)
    assert call_bytes(replace(CLIP, inflated=True), 8) > call_bytes(CLIP, 8)
    assert call_bytes(CLIP, 40) == one  # a pass never holds more than the clip


def test_auto_takes_one_pass_when_the_clip_fits_and_else_the_largest_that_fits():
    plan, fits = plan_passes(CLIP, None)
    assert fits and plan == PassPlan(32, 32, 1, call_bytes(CLIP, 32)) and plan.passes == 1
    free = call_bytes(CLIP, 12) / 0.8 + 1
    plan, fits = plan_passes(CLIP, free)
    assert fits and plan.frames_per_pass == 12 and plan.passes == 3
    assert call_bytes(CLIP, 13) > 0.8 * free  # 12 is the largest


def test_a_given_pass_size_is_kept_and_judged():
    free = call_bytes(CLIP, 12) / 0.8 + 1
    assert plan_passes(CLIP, free, frames_per_pass=8) == (PassPlan(32, 8, 1, call_bytes(CLIP, 8)), True)
    plan, fits = plan_passes(CLIP, free, frames_per_pass=16)
    assert plan.frames_per_pass == 16 and not fits
    assert plan_passes(CallShape(5, N), None, frames_per_pass=8)[0].frames_per_pass == 5


def test_nothing_fits_reports_one_frame_a_pass():
    plan, fits = plan_passes(CLIP, 1000)
    assert not fits and plan.frames_per_pass == 1 and plan.passes == 32
    with pytest.raises(ValueError):
        plan_passes(CallShape(0, N), None)


def test_a_tokenflow_step_is_planned_in_keyframes_a_pass():
    # 240 frames in batches of 8: 30 keyframes in 3 branches; fewer keyframes a pass need less
    # memory, down to a propagation pass of 8 frames, and the keyframe record is always there
    keyframes = CallShape(30, N, rows_per_frame=3)
    whole, four, one = (tokenflow_step_bytes(keyframes, 8, n) for n in (30, 4, 1))
    assert whole > four > one >= call_bytes(CallShape(8, N, 3), 8) + SD1.record_bytes * N * 30
    assert tokenflow_step_bytes(replace(keyframes, rows_per_frame=2), 8, 4) < four
    assert tokenflow_step_bytes(replace(keyframes, element_size=2), 8, 4) < four
    plan, fits = plan_tokenflow(keyframes, 8, None)
    assert fits and plan.frames_per_pass == 30 and plan.passes == 1
    plan, fits = plan_tokenflow(keyframes, 8, four / 0.8 + 1)
    assert fits and plan.frames_per_pass == 4 and plan.passes == 8
    plan, fits = plan_tokenflow(keyframes, 8, four / 0.8 + 1, keyframes_per_pass=10)
    assert plan.frames_per_pass == 10 and not fits
    plan, fits = plan_tokenflow(keyframes, 8, 1000)
    assert plan.frames_per_pass == 1 and not fits


def test_sdxl_has_its_own_profile():
    xl = CallShape(8, N, profile=SDXL)
    assert call_bytes(xl, 8) != call_bytes(CallShape(8, N), 8)
    assert SDXL.record_values == 6400 and SD1.record_values == 2820  # 70 self-attentions against 16
    assert plan_passes(xl, None)[0].estimated_bytes == call_bytes(xl, 8)


def test_a_computing_pass_grows_by_beyond_past_a_chunk_of_rows():
    """Past CHUNK_TOKENS token-rows the per-frame modules work in chunks: each further token-row of
    the computing pass costs ``beyond``, not ``active``; below it nothing changed."""
    from stem.memory import CHUNK_TOKENS, SD1, CallShape, call_bytes

    assert CHUNK_TOKENS == 8 * 64 * 64  # 8 frames of 512x512
    one = lambda frames, rows=1: call_bytes(CallShape(frames, 64 * 64, rows), frames)  # noqa: E731
    assert one(8) - one(4) == SD1.active * 4 * 4096
    assert one(16) - one(8) == SD1.beyond * 8 * 4096 < SD1.active * 8 * 4096
    assert one(4, rows=2) == one(8) - SD1.fixed + SD1.fixed  # rows count as frames do
    half = call_bytes(CallShape(16, 4096, element_size=2), 16)
    assert half - SD1.fixed == (one(16) - SD1.fixed) // 2
