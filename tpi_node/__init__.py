"""tpi-node: serve one large language model on the machines you already own."""

import os as _os

# OpenMP threads that spin while waiting turn a matrix product into a 10-30x slowdown as soon as
# another process wants the same cores (a worker next to the master, a test runner, a laptop's
# browser). Passive waiting costs nothing measurable when the machine is quiet. Read by the
# OpenMP runtime when torch loads it, so it must be set before the first `import torch`; a value
# the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tpi_node import heap as _heap  # noqa: E402  (after the environment it must not precede)

_heap.limit_arenas()

__version__ = "0.1.0"
