"""Compiled loops for the recursions numpy cannot fuse (private).

A recursion over time (Holt-Winters' level, trend and seasonals) is a loop of a few arithmetic
operations a step.  In numpy each operation is a pass over the whole batch, ten of them a step;
compiled by numba, the steps of one series stay in registers and cache.  Every compiled loop here
has a numpy twin that does the same operations in the same order, so the two give the same bits
(tests compare them) and the numpy one serves where numba cannot: not installed, or
``NUMBA_DISABLE_JIT=1`` (which would run the loop as plain Python, far slower than numpy).
"""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["compiled"]

_compiled: dict[Callable, Callable | None] = {}


def compiled(fn: Callable) -> Callable | None:
    """``fn`` compiled by numba (nopython, releasing the GIL, cached on disk where it can be), or
    None when numba is not available or its JIT is disabled.  Compiled once per process; the disk
    cache spares later processes (a Dask worker) the compilation."""
    if fn in _compiled:
        return _compiled[fn]
    try:
        import numba
    except ImportError:
        out = None
    else:
        if numba.config.DISABLE_JIT:
            out = None
        else:
            try:
                out = numba.njit(cache=True, nogil=True)(fn)
            except RuntimeError:  # no writable cache folder (a read-only image without a home): compile each time
                out = numba.njit(nogil=True)(fn)
    _compiled[fn] = out
    return out
