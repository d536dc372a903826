"""glibc's malloc tuned for the span of one work unit, on the workers of the cluster a job makes.

Dask starts its worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``: every freed block goes
back to the system at once, and glibc's adaptive threshold is off, so every array over 128 KiB
is mapped afresh and its pages fault in again.  A unit makes and drops arrays the size of its
columns one after another (about 30,000 page faults a worker for 100,000 groups).  While a unit
runs, arrays up to 32 MiB are reused from the heap and up to 128 MiB of freed memory is kept;
when it ends Dask's setting is restored, and if the process then holds more than half its
memory limit, everything freed is handed back (``malloc_trim``): memory kept for reuse once
left a worker over Dask's pause threshold for good, and the job waiting for it.  (Handing it
back after every unit would fault each unit's pages in again: half the gain.)

Only on the workers of :func:`modelfactory.run.local_cluster` (which set :data:`FLAG`), with
glibc, and when neither threshold was set by the user.  No Dask here.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

__all__ = ["FLAG", "unit_memory"]

#: Set in the environment of the workers of :func:`modelfactory.run.local_cluster`.
FLAG = "MODELFACTORY_UNIT_MALLOC"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_DURING = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 128 << 20))
# what Dask's MALLOC_TRIM_THRESHOLD_=65536 gives a worker: that trim threshold, and glibc's
# fixed 128 KiB mmap threshold (setting either turns the adaptive one off)
_AFTER = ((_M_MMAP_THRESHOLD, 128 << 10), (_M_TRIM_THRESHOLD, 65536))
_libc: object = None  # ctypes library once looked up; False: not glibc


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None)
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def _tuned() -> bool:
    env = os.environ
    return (env.get(FLAG) == "1" and env.get("MALLOC_TRIM_THRESHOLD_", "65536") == "65536"
            and "MALLOC_MMAP_THRESHOLD_" not in env)


@contextlib.contextmanager
def unit_memory(limit: int | None = None) -> Iterator[None]:
    """Keep freed memory for reuse while the block runs; after it, hand it all back if the
    process holds more than half of ``limit`` bytes (its memory limit; None: no limit)."""
    libc = _glibc() if _tuned() else None
    if libc is None:
        yield
        return
    for param, value in _DURING:
        libc.mallopt(param, value)
    try:
        yield
    finally:
        for param, value in _AFTER:
            libc.mallopt(param, value)
        if limit and _rss() > limit // 2:
            libc.malloc_trim(0)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss
