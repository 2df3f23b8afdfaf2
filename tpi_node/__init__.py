"""tpi-node: serve one large language model on the machines you already own."""

import os as _os

# OpenMP threads that spin while waiting turn a matrix product into a 10-30x slowdown as soon as
# another process wants the same cores (a worker next to the master, a test runner, a laptop's
# browser). Passive waiting costs nothing measurable when the machine is quiet. Read by the
# OpenMP runtime when torch loads it, so it must be set before the first `import torch`; a value
# the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that meets a locked arena a new one (up to 8 per core), and freed
    activations stay cached in each: under load on busy cores a serving process's anonymous memory
    grew ~100 MiB past its --memory-budget this way (tests/test_cgroup_load.py: peak 840 MiB with
    the default, 770 MiB with 2 arenas, same speed). Done at import, before threads start; a
    MALLOC_ARENA_MAX the user set wins; nothing happens off glibc."""
    if "MALLOC_ARENA_MAX" in _os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


_limit_malloc_arenas()

__version__ = "0.1.0"
