"""`util/heap.py`: inside `steady_heap` large tensors freed and allocated again reuse the heap's pages."""

import platform
import resource

import pytest
import torch

from patchscope.util import heap

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")


def _faults_per_round(rounds: int) -> list[int]:
    """Minor page faults of each round of a forward's pattern: large tensors allocated, filled and freed."""
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        first = torch.empty(40 << 18).fill_(1.0)  # float32: 40 MiB
        second = torch.empty(48 << 18).fill_(2.0)  # held beside it
        del first
        third = torch.empty(36 << 18).fill_(3.0)
        del second, third
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


@glibc_only
def test_inside_large_tensors_are_reused():
    """glibc places the first rounds' tensors until its heap has room for the pattern; then they cost no page.
    (Its own settings, above its 32 MiB ceiling, map each of them afresh: about 3 x 12,288 pages a round.)"""
    mapping = (48 << 20) // resource.getpagesize()  # the pages of one fresh 48 MiB tensor
    with heap.steady_heap() as applied:
        if not applied:
            pytest.skip("this glibc refuses a 1 GiB mmap threshold, or the environment tunes the allocator")
        inside = _faults_per_round(12)[8:]
    assert sum(inside) < mapping // 4, inside


def test_it_stays_out_of_the_way_when_asked_or_when_the_user_tuned_malloc(monkeypatch):
    with heap.steady_heap(enabled=False) as applied:
        assert not applied
    for name, value in (("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with heap.steady_heap() as applied:
                assert not applied, name
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    with heap.steady_heap() as applied:
        assert not applied


class _Recorder:
    """Stands in for glibc: records the calls, and accepts (1) or refuses (0) every `mallopt`."""

    def __init__(self, accepts: bool) -> None:
        self.accepts, self.calls = accepts, []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return int(self.accepts)

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad, 0))
        return 1


def test_the_free_memory_is_returned_when_the_loop_fails(monkeypatch):
    libc = _Recorder(accepts=True)
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with pytest.raises(KeyboardInterrupt), heap.steady_heap():
        raise KeyboardInterrupt
    assert libc.calls == [
        ("mallopt", heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD),
        ("mallopt", heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD),
        ("malloc_trim", 0, 0),
    ]


def test_a_refused_mmap_threshold_leaves_the_trim_threshold_alone(monkeypatch):
    """Older glibc caps the mmap threshold at 32 MiB; setting the trim threshold then would freeze it where it is."""
    libc = _Recorder(accepts=False)
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with heap.steady_heap() as applied:
        assert not applied
    assert libc.calls == [("mallopt", heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD)]
