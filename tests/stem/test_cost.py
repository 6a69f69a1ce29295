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
