"""The library's one cached threadpoolctl controller (private)."""
from __future__ import annotations

import sys

from threadpoolctl import ThreadpoolController

__all__ = ["thread_pools"]

_controller: tuple[int, ThreadpoolController] | None = None


def thread_pools() -> ThreadpoolController:
    """A controller of the BLAS and OpenMP pools loaded in this process.

    Finding the loaded pools takes milliseconds, so the controller is kept and made again only
    when modules have been imported since (a user function's first import can load a new pool).
    """
    global _controller
    if _controller is None or _controller[0] != len(sys.modules):
        _controller = (len(sys.modules), ThreadpoolController())
    return _controller[1]
