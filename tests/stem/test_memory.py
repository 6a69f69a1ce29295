"""The memory plan of a UNet call in passes (stem.memory), on its own arithmetic."""
import pytest

from stem.memory import PassPlan, estimate_bytes, plan_passes

N = 32 * 32  # a 256x256 frame's first-level tokens


def test_the_estimate_grows_with_frames_and_pass_size_and_halves_in_half_precision():
    one = estimate_bytes(32, 32, N)
    assert estimate_bytes(64, 64, N) > one > estimate_bytes(32, 8, N) > estimate_bytes(32, 1, N) > 0
    assert estimate_bytes(32, 8, N) > estimate_bytes(16, 8, N)  # waiting frames hold memory too
    assert estimate_bytes(32, 8, N, rows_per_frame=2) > estimate_bytes(32, 8, N)
    assert estimate_bytes(32, 8, N, element_size=2) < estimate_bytes(32, 8, N)
    assert estimate_bytes(32, 8, N, inflated=True) > estimate_bytes(32, 8, N)
    assert estimate_bytes(32, 40, N) == one  # a pass never holds more than the clip


def test_auto_takes_one_pass_when_the_clip_fits_and_else_the_largest_that_fits():
    plan, fits = plan_passes(32, N, None)
    assert fits and plan == PassPlan(32, 32, 1, estimate_bytes(32, 32, N)) and plan.passes == 1
    free = estimate_bytes(32, 12, N) / 0.8 + 1
    plan, fits = plan_passes(32, N, free)
    assert fits and plan.frames_per_pass == 12 and plan.passes == 3
    assert estimate_bytes(32, 13, N) > 0.8 * free  # 12 is the largest


def test_a_given_pass_size_is_kept_and_judged():
    free = estimate_bytes(32, 12, N) / 0.8 + 1
    assert plan_passes(32, N, free, frames_per_pass=8) == (PassPlan(32, 8, 1, estimate_bytes(32, 8, N)), True)
    plan, fits = plan_passes(32, N, free, frames_per_pass=16)
    assert plan.frames_per_pass == 16 and not fits
    assert plan_passes(5, N, None, frames_per_pass=8)[0].frames_per_pass == 5


def test_nothing_fits_reports_one_frame_a_pass():
    plan, fits = plan_passes(32, N, 1000)
    assert not fits and plan.frames_per_pass == 1 and plan.passes == 32
    with pytest.raises(ValueError):
        plan_passes(0, N, None)


def test_a_tokenflow_step_is_planned_in_keyframes_a_pass():
    from stem.memory import SD1, plan_tokenflow, tokenflow_estimate_bytes

    # 240 frames in batches of 8: 30 keyframes; fewer keyframes a pass need less memory, down to
    # a propagation pass of 8 frames, and the keyframe record is always there
    whole, four, one = (tokenflow_estimate_bytes(30, n, 8, N) for n in (30, 4, 1))
    assert whole > four > one >= estimate_bytes(8, 8, N, 3) + SD1.record_bytes * N * 30
    assert tokenflow_estimate_bytes(30, 4, 8, N, branches=2) < four
    assert tokenflow_estimate_bytes(30, 4, 8, N, element_size=2) < four
    plan, fits = plan_tokenflow(30, 8, N, None)
    assert fits and plan.frames_per_pass == 30 and plan.passes == 1
    plan, fits = plan_tokenflow(30, 8, N, four / 0.8 + 1)
    assert fits and plan.frames_per_pass == 4 and plan.passes == 8
    plan, fits = plan_tokenflow(30, 8, N, four / 0.8 + 1, keyframes_per_pass=10)
    assert plan.frames_per_pass == 10 and not fits
    plan, fits = plan_tokenflow(30, 8, N, 1000)
    assert plan.frames_per_pass == 1 and not fits


def test_sdxl_has_its_own_profile():
    from stem.memory import SD1, SDXL, plan_passes

    assert estimate_bytes(8, 8, N, profile=SDXL) != estimate_bytes(8, 8, N, profile=SD1)
    assert SDXL.record_values == 6400 and SD1.record_values == 2820  # 70 self-attentions against 16
    assert plan_passes(8, N, None, profile=SDXL)[0].estimate_bytes == estimate_bytes(8, 8, N, profile=SDXL)


# Interleaved blocks in a fresh process: 5 MiB blocks that the process frees between 64 KiB blocks
# that it keeps, as a computing pass frees its activations between the blocks of waiting passes.
_INTERLEAVED = r"""
import json, torch
from stem.cost import resident_bytes as resident
from stem.memory import return_free_memory

big = torch.ones(6 * 2**20)  # a freed 24 MiB block: glibc's threshold rises to it, as in any torch process
del big
kept, freed = [], []
for _ in range(100):
    freed.append(torch.ones(5 * 2**18))   # 5 MiB, written: resident
    kept.append(torch.ones(2**14))        # 64 KiB
before = resident()
del freed
after_free = resident()
trimmed = return_free_memory()
after_trim = resident()
print(json.dumps({"trimmed": trimmed, "on_free": before - after_free, "on_trim": after_free - after_trim,
                  "kept": sum(float(k[0]) for k in kept)}))
"""


def test_pages_freed_between_kept_blocks_go_back_to_the_system_when_asked():
    """glibc keeps the pages of blocks freed between live ones (issue 10: a long clip in passes
    grew by 15-20 MiB a frame where the waiting passes hold 11.5); return_free_memory hands the
    500 MiB freed that way back, and the kept blocks keep their values."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator: Linux only")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _INTERLEAVED], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["trimmed"] and r["kept"] == 100.0
    assert r["on_free"] < 100 * 2**20, r  # freeing alone leaves the pages resident
    assert r["on_trim"] > 450 * 2**20, r  # handed back when asked


def test_returning_free_memory_says_whether_it_could():
    from stem.memory import _glibc, return_free_memory

    assert return_free_memory() is (_glibc() is not None)


def test_hand_back_is_due_once_resident_memory_grew_by_its_growth():
    """Passes hand freed pages back at a meeting only after the resident memory grew by
    ``growth`` since the last hand-back (each hand-back costs page faults when the pages are used
    again); growth 0 hands back at every meeting."""
    from stem.memory import HAND_BACK_GROWTH, HandBack

    MiB = 2**20
    rss = [500 * MiB]

    def meetings(hb, resident_mib):
        due = []
        for now in resident_mib:
            rss[0] = now * MiB
            due.append(hb.due())
            if due[-1]:
                rss[0] -= 200 * MiB  # what the hand-back returned
                hb.done()
        return due

    hb = HandBack(64 * MiB, resident=lambda: rss[0])
    assert HAND_BACK_GROWTH == 64 * MiB and hb.growth == HAND_BACK_GROWTH
    # counted from 500 at the start: due at 564; from 364 after it: due at 428; from 228: a drop
    # to 100 is not growth, 291 is 63 MiB above the mark, 292 is due
    assert meetings(hb, [520, 563, 564, 420, 428, 100, 291, 292]) == [False, False, True, False, True, False, False, True]
    rss[0] = 500 * MiB
    assert meetings(HandBack(0, resident=lambda: rss[0]), [500, 400, 300]) == [True] * 3
