"""serve_app.allocator: glibc's own heap figures, and malloc_trim giving free pages back."""

from __future__ import annotations

import ctypes
import os

import pytest

from serve_app import allocator

pytestmark = pytest.mark.skipif(not allocator.is_glibc(), reason="glibc malloc only")


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_stats_reads_glibc_heap_figures():
    s = allocator.stats()
    assert set(s) == {"arenas", "heap_mb", "in_use_mb", "free_mb", "mmapped_mb"}
    assert s["arenas"] >= 1
    assert s["heap_mb"] >= s["in_use_mb"] > 0


def test_freed_heap_memory_is_counted_free_and_trim_gives_it_back():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunk = 64 << 10  # below any mmap threshold: these come from the heap
    blocks = [libc.malloc(chunk) for _ in range(2400)]  # 150 MiB
    guard = libc.malloc(chunk)  # keeps the freed blocks below the heap's top, where glibc does not trim by itself
    try:
        for b in blocks:
            ctypes.memset(b, 1, chunk)  # touch the pages, so they are resident
        before = allocator.stats()
        for b in blocks:
            libc.free(b)
        freed = allocator.stats()
        assert freed["free_mb"] - before["free_mb"] > 100
        held = rss_mb()
        assert allocator.trim() is True
        assert held - rss_mb() > 100  # the free pages went back to the kernel
    finally:
        libc.free(guard)
