"""The C heap under torch and grpc (glibc malloc): how much of what Python frees goes back.

limit_arenas()      at import (tpi_node/__init__.py), before threads start
trim()              after big frees (a re-plan drops a whole deployment, `tune` its timing runs)
huge_empty(n)       a buffer for weights: transparent huge pages where the kernel allows them
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import sys

import torch

M_ARENA_MAX = -8  # glibc malloc.h
MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 << 20  # x86-64's and most arm64 kernels' transparent huge page


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


def trim(collect: bool = True) -> None:
    """Collect cycles, then hand the heap's free pages back to the kernel (glibc keeps them
    otherwise, and a master that re-planned a few times looked like it leaked). collect=False
    skips the collection (~60 ms in a loaded node; malloc_trim alone takes ~20 us): for memory
    that C code freed, with no Python cycle holding it."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def huge_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of nbytes for weights, its whole 2 MiB pages marked for
    transparent huge pages (madvise; the usual setting of /sys/kernel/mm/transparent_hugepage).
    Decode reads every weight once a token, from DRAM: with 4 KiB pages the CPU's prefetchers stop
    at each page and the TLB misses every few rows; with 2 MiB pages the quantised kernel read
    SmolLM2's Q8_0 head in 1.26 ms against 2.0 (2 threads), and with int8 activations its gate|up
    in 48 us against 73-77 (copies cycled cold as scripts/bench_quant_kernels.py does). The buffer
    starts at a 2 MiB boundary of a mapping of its own, slightly larger: the slack is never
    touched, so it takes no memory (from malloc's heap it could be pages a freed block left
    resident). Elsewhere: torch.empty."""
    libc = _libc() if nbytes >= HUGE_PAGE and sys.platform.startswith("linux") else None
    if libc is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # (the default, shared, would be shmem: no THP)
    raw = torch.frombuffer(mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private), dtype=torch.uint8)  # holds the mapping
    out = raw[-raw.data_ptr() % HUGE_PAGE :][:nbytes]  # a view: it keeps raw's storage alive
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(out.data_ptr(), nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)  # advice: may fail, fine
    return out
