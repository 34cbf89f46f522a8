"""Keep glibc's heap steady from the first CPU profiling loop of a process on.

A forward allocates and frees tensors of tens of MB at every layer. glibc decides per request
whether it comes from the heap or from a fresh ``mmap``, and trims the top of the heap back to the
system once enough of it is free, both by thresholds it adjusts as it goes. How those settle depends
on everything else the process allocates. Measured on Gemma 3 270M, all 18 layers, 600 paragraphs
(2-core EPYC, glibc 2.36, benchmarks/RESULTS.md): the bare forward and the profiler with top-k and
moments only faulted almost no pages, but with the default statistics the same forward faulted
1.5-6 million pages a run (every large tensor freshly mapped and zeroed), 11% of the run's time.
With both thresholds fixed high for the loop, 0.14 million.

`steady_heap` fixes both high and leaves them so: glibc cannot be put back into its adjusting mode,
and the values that adjustment reaches with large tensors (mmap threshold 32 MiB, trim threshold
64 MiB), set after the loop, made a later bare forward of the same model fault 130,000-144,000
pages and run 39.1-41.1 s instead of 37.8-38.7 s. Leaving the loop it returns the heap's free memory
to the system (``malloc_trim``); afterwards the heap keeps up to 1 GiB of freed memory for reuse.
Nothing happens where the C library is not glibc, where an allocator is preloaded (``LD_PRELOAD`` naming
jemalloc, tcmalloc or mimalloc: glibc's settings would not reach it), where the user has set any of glibc's
``MALLOC_*`` variables or ``GLIBC_TUNABLES``, or where glibc refuses the 1 GiB threshold (some older releases
cap it at 32 MiB; then the trim threshold is left alone too, since setting it would freeze the mmap
threshold wherever it stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # requests below 1 GiB come from the heap
TRIM_THRESHOLD = 1 << 30  # the heap keeps up to 1 GiB free at its top (2**31 - 1, the most an int holds, measured worse)
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, when it is glibc, no other allocator is preloaded and the user has not tuned it."""
    if platform.libc_ver()[0] != "glibc" or "GLIBC_TUNABLES" in os.environ:
        return None
    if any(name.startswith("MALLOC_") for name in os.environ):
        return None
    if any(allocator in os.environ.get("LD_PRELOAD", "") for allocator in _PRELOADED_ALLOCATORS):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def steady_heap(enabled: bool = True) -> Iterator[bool]:
    """From here on large tensors are reused from the heap instead of mapped afresh; leaving, the free
    memory goes back to the system. Yields whether it applied."""
    libc = _glibc() if enabled else None
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:  # 1: accepted
        yield False
        return
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    try:
        yield True
    finally:
        libc.malloc_trim(0)
