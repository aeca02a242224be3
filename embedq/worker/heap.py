"""A worker process's heap: the cyclic GC and the C allocator, settled once the model is
loaded, and freed pages given back only when the heap has grown.

Two costs on the worker's hot path come from the heap rather than the code (issue 13):

- **The cyclic GC** walked the hundreds of thousands of objects that torch, transformers,
  pymilvus and gRPC leave at start-up, a tenth of a drained worker's time. Frozen, they are
  never walked again; a large young generation (``GC_YOUNG_THRESHOLD``) lets a window's
  token lists and items die by refcount before a collection sees them.
- **Page faults.** One 256-row batch of short texts makes tensors of megabytes (rows ×
  length × hidden). glibc serves those from fresh ``mmap`` pages or trims them off the top
  of the heap when freed, so every batch faulted its pages back in and the kernel zeroed
  them: the zero-layer forward cost twice as much per text as with the pages kept. Trimming
  after every read window (how RSS was kept flat before) did the same on a larger scale.

So glibc keeps freed memory (blocks up to 32 MiB come from the heap, nothing is trimmed on
free) and ``release_free_heap`` trims only when RSS has grown ``TRIM_GROWTH_BYTES`` past
what the last trim left: RSS stays within that margin of its settled size, however long
the backlog (tensors of ever-changing shapes fragment the heap; untrimmed, a CPU worker's
RSS nearly doubled over a long backlog). Under another allocator (jemalloc preloaded) the
glibc calls are no-ops and that allocator's own settings apply. Figures: see
docs/benchmarks.md#worker-memory-over-a-longer-backlog.
"""

from __future__ import annotations

import gc
import os
import resource
from pathlib import Path
from typing import Any

# Young objects (container allocations net of frees) between two collections of the
# youngest generation; CPython's default is 700.
GC_YOUNG_THRESHOLD = 50_000
# glibc's largest allowed fixed mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): a batch's
# tensors below it are reused from the heap instead of mapped and faulted in again.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
NEVER_TRIM_ON_FREE = 2**31 - 1  # M_TRIM_THRESHOLD is a C int
TRIM_GROWTH_BYTES = 128 * 1024 * 1024  # RSS above the last trim's that triggers a trim
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def _load_libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    has = libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")
    return libc if has else None


_LIBC = _load_libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set now (Linux ``/proc/self/statm``; else the peak)."""
    try:
        return int(Path("/proc/self/statm").read_bytes().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Trim:
    floor = 0  # RSS right after the last trim (0: none yet)


def settle_heap() -> None:
    """Once the model is loaded: freeze what start-up allocated, collect the young rarely,
    and let glibc keep a batch's freed pages (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, NEVER_TRIM_ON_FREE)
        _LIBC.malloc_trim(0)
        _Trim.floor = rss_bytes()


def release_free_heap() -> bool:
    """Give freed heap pages back to the OS if RSS grew ``TRIM_GROWTH_BYTES`` since the last
    trim (glibc only; elsewhere a no-op). Cheap enough to call after every batch and read
    window: one read of ``/proc/self/statm``. True if it trimmed. Called from several
    stage threads: a race on the floor at worst trims once more or once later."""
    if _LIBC is None:
        return False
    if _Trim.floor and rss_bytes() < _Trim.floor + TRIM_GROWTH_BYTES:
        return False
    _LIBC.malloc_trim(0)
    _Trim.floor = rss_bytes()
    return True
