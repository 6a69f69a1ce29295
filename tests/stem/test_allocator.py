"""Handing freed memory back to the system (stem.allocator)."""
import pytest

# Interleaved blocks in a fresh process: 5 MiB blocks that the process frees between 64 KiB blocks
# that it keeps, as a computing pass frees its activations between the blocks of waiting passes.
_INTERLEAVED = r"""
import json, torch
from stem.cost import resident_bytes as resident
from stem.allocator import return_free_memory

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
    """glibc keeps the pages of blocks freed between live ones (a long clip in passes grows by more
    than its waiting passes hold); return_free_memory hands the 500 MiB freed that way back, and
    the kept blocks keep their values."""
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
    from stem.allocator import _glibc, return_free_memory

    assert return_free_memory() is (_glibc() is not None)


def test_hand_back_is_due_once_resident_memory_grew_by_its_growth():
    """Passes hand freed pages back at a meeting only after the resident memory grew by
    ``growth`` since the last hand-back (each hand-back costs page faults when the pages are used
    again); growth 0 hands back at every meeting."""
    from stem.allocator import HAND_BACK_GROWTH, HandBack

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
