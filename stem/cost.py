"""Wall time and peak memory of a piece of work (the inversion comparison, the benchmarks).

On a CUDA device the peak is ``torch.cuda.max_memory_allocated`` over the run, minus what was
allocated before. On the CPU it is the process's peak resident memory over the run, minus the
resident memory at the start. On Linux the kernel keeps that peak itself (``VmHWM``), and
writing 5 to ``/proc/self/clear_refs`` restarts it, so measuring costs two file reads and
nothing during the run (the peak is the process's own accounting and changes no computation).
Elsewhere a background thread samples the resident memory every 20 ms: a short spike between
two samples can be missed there.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SAMPLE_INTERVAL_S = 0.02  # the fallback sampler's period


def resident_bytes() -> int:
    """The process's resident memory (Linux /proc; elsewhere psutil if present, else 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


def _restart_kernel_peak() -> bool:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _kernel_peak() is not None
    except OSError:
        return False


def _kernel_peak() -> int | None:
    """``VmHWM``, the peak resident memory since the last restart, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class Cost:
    seconds: float = 0.0
    peak_bytes: int = 0
    kind: str = "cpu-rss"  # or "cuda-allocated"

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "peak_mib": round(self.peak_bytes / 2**20, 1), "memory": self.kind}


class measure:
    """``with measure(device) as cost: ...`` fills ``cost.seconds`` and ``cost.peak_bytes``."""

    def __init__(self, device: torch.device | str | None = None, interval: float = SAMPLE_INTERVAL_S):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        self.cost = Cost(kind="cuda-allocated" if self.device.type == "cuda" else "cpu-rss")
        self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, resident_bytes())

    def __enter__(self) -> Cost:
        if self.cost.kind == "cuda-allocated":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = self._peak = resident_bytes()
            if not _restart_kernel_peak():
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        self._t0 = time.perf_counter()
        return self.cost

    def __exit__(self, *exc) -> None:
        self.cost.seconds = time.perf_counter() - self._t0
        if self.cost.kind == "cuda-allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, resident_bytes())
        else:
            peak = max(self._peak, _kernel_peak() or 0, resident_bytes())
        self.cost.peak_bytes = max(0, peak - self._base)
