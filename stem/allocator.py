"""Giving the memory that a run freed back to the system.

On the CPU a tensor is a C allocation. glibc serves a block under its mmap threshold from heaps
that it does not shrink around live blocks, and the threshold rises by itself, up to 32 MiB,
each time a larger mapped block is freed: in a torch process nearly every activation of a pass
below 32 MiB ends up in those heaps. Passes that wait at a layer keep their blocks between the
blocks that the computing pass frees, so the process keeps pages that nothing uses and its
resident memory grows by more than the passes hold. :func:`return_free_memory` hands those
pages back (glibc's ``malloc_trim``); :class:`HandBack` says when, during a run in passes.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable

from .cost import resident_bytes


@functools.lru_cache(maxsize=None)
def _glibc():
    """The process's C library where it is glibc (its ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl, for one, has no malloc_trim)
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def return_free_memory() -> bool:
    """Hand the free pages inside glibc's heaps back to the system (``malloc_trim(0)``), so that
    the resident memory is what is held; False where the C library is not glibc. Nothing held
    moves or changes; a page handed back costs a page fault when it is used again."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# How much the resident memory may grow between two hand-backs while passes run: a hand-back
# costs page faults when the next pass reuses the pages, so it waits until enough has piled up
# (the README's long-clip section has the measured trade). It bounds what the process keeps
# beyond what it holds.
HAND_BACK_GROWTH = 64 * 2**20


class HandBack:
    """When the free pages of a run in passes go back to the system: at a meeting where the
    process's resident memory has grown by at least ``growth`` bytes since the last hand-back
    (or since the start); at every meeting where ``growth`` is 0 or less."""

    def __init__(self, growth: int = HAND_BACK_GROWTH, resident: Callable[[], int] = resident_bytes):
        self.growth = int(growth)
        self.resident = resident
        self.mark = self.resident()

    def due(self) -> bool:
        """Has the resident memory grown enough since the last hand-back?"""
        return self.growth <= 0 or self.resident() - self.mark >= self.growth

    def done(self) -> None:
        """The pages went back: growth counts from here."""
        self.mark = self.resident()
