"""What glibc's malloc holds in this process, and handing its free pages back.

Image replicas allocate and free buffers of many sizes (a 1024x1024 RGBA
float64 matte is 32 MiB, a 256x256 PNG's rows 0.2 MiB) from several threads:
Ray Serve runs a deployment's sync methods on a pool of up to
``max_ongoing_requests`` threads, and glibc gives each thread that meets a
locked arena a new one (up to 8 per core). Freed memory stays in the arena
that held it, and glibc returns it to the kernel only from the top of an
arena's heap, so RSS climbs to the sum of every arena's high-water mark.
docs/reliability.md ("Memory") has the figures.

Everything here is a no-op where the C library is not glibc (macOS, musl):
those allocators have their own policies and these functions do not exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from typing import Any

_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # mallinfo2 (glibc 2.33+) is the one that does not wrap at 4 GiB.
    if not all(hasattr(libc, name) for name in ("malloc_trim", "mallinfo2", "malloc_info", "open_memstream")):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallinfo2.restype = _Mallinfo2
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.open_memstream.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.malloc_info.restype = ctypes.c_int
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


_LIBC = _load_libc()


def is_glibc() -> bool:
    return _LIBC is not None


def trim() -> bool:
    """``malloc_trim(0)``: give every arena's free pages back to the kernel.
    True when some memory was released; False when none was, or not glibc."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def malloc_info_xml() -> str:
    """glibc's own report (``malloc_info``): one ``<heap nr=...>`` per arena."""
    if _LIBC is None:
        return ""
    buf, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = _LIBC.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return ""
    try:
        _LIBC.malloc_info(0, stream)
    finally:
        _LIBC.fclose(stream)  # flushes into buf
    try:
        return ctypes.string_at(buf, size.value).decode("ascii", "replace")
    finally:
        _LIBC.free(buf)


def stats() -> dict[str, Any]:
    """Heap figures in MiB, from glibc's own accounting: ``heap_mb`` (arena
    memory taken from the kernel, all arenas), ``in_use_mb`` and ``free_mb``
    (of that), ``mmapped_mb`` (chunks mapped on their own, given back when
    freed), and ``arenas`` (count). Empty where the C library is not glibc."""
    if _LIBC is None:
        return {}
    info = _LIBC.mallinfo2()
    mb = 1 / 2**20
    return {
        "arenas": len(re.findall(r'<heap nr="\d+">', malloc_info_xml())),
        "heap_mb": round(info.arena * mb, 1),
        "in_use_mb": round(info.uordblks * mb, 1),
        "free_mb": round(info.fordblks * mb, 1),
        "mmapped_mb": round(info.hblkhd * mb, 1),
    }
