"""Wall time and peak memory measurement."""
import time

import torch

from stem.cost import measure, resident_bytes


def test_cpu_peak_sees_a_temporary_allocation_and_time_is_measured():
    with measure("cpu") as cost:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        time.sleep(0.02)
        del x
    assert cost.kind == "cpu-rss"
    assert cost.seconds >= 0.02
    assert 48 * 2**20 < cost.peak_bytes < 256 * 2**20
    assert cost.as_dict()["peak_mib"] > 48


def test_nothing_allocated_means_little_peak():
    with measure() as cost:
        time.sleep(0.005)
    assert cost.peak_bytes < 16 * 2**20 and resident_bytes() > 0


def test_the_fallback_sampler_sees_a_held_allocation(monkeypatch):
    """Where the kernel's peak counter cannot be restarted, a sampling thread measures."""
    import stem.cost as cost_mod

    monkeypatch.setattr(cost_mod, "_restart_kernel_peak", lambda: False)
    with measure("cpu") as cost:
        x = torch.ones(64 * 2**20 // 4)
        x += 1
        time.sleep(0.1)  # five sampling periods
        del x
    assert 48 * 2**20 < cost.peak_bytes < 256 * 2**20


def test_a_peak_before_the_measurement_does_not_count():
    x = torch.ones(128 * 2**20 // 4)
    x += 1
    del x
    with measure("cpu") as cost:
        time.sleep(0.005)
    assert cost.peak_bytes < 16 * 2**20


def test_on_cuda_the_peak_is_cudas_allocated_peak_above_what_was_allocated_before(monkeypatch):
    """The CUDA branch, with torch.cuda's counters faked where no GPU exists: the peak is the
    allocator's peak during the work minus what was allocated when it began."""
    state = {"allocated": 3 * 2**30, "peak": 3 * 2**30, "synced": 0, "reset": 0}

    def reset(device=None):
        state["reset"] += 1
        state["peak"] = state["allocated"]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: state.__setitem__("synced", state["synced"] + 1))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    with measure("cuda:0") as cost:
        state["peak"] = state["allocated"] + 5 * 2**30  # the work's transient peak
    assert cost.kind == "cuda-allocated" and cost.peak_bytes == 5 * 2**30
    assert state["reset"] == 1 and state["synced"] == 2
    assert cost.as_dict() == {"seconds": round(cost.seconds, 3), "peak_mib": 5120.0, "memory": "cuda-allocated"}
