"""The C heap under torch and grpc (glibc malloc): how much of what Python frees goes back.

limit_arenas()   at import (tpi_node/__init__.py), before threads start
trim()           after big frees (a re-plan drops a whole deployment)
"""

from __future__ import annotations

import ctypes
import gc
import os

M_ARENA_MAX = -8  # glibc malloc.h


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None


def limit_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that meets a locked arena a new one (up to 8 per core), and freed
    activations stay cached in each: under load on busy cores a serving process's anonymous memory
    grew ~100 MiB past its --memory-budget this way (tests/test_cgroup_load.py: peak 840 MiB with
    the default, 716 MiB with 2 arenas, same speed). A MALLOC_ARENA_MAX the user set wins."""
    libc = _libc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, arenas)


def trim() -> None:
    """Collect cycles, then hand the heap's free pages back to the kernel (glibc keeps them
    otherwise, and a master that re-planned a few times looked like it leaked)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
