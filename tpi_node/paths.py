"""Where tpi-node keeps its files, resolved in one place.

    tpi_home()            $TPI_HOME (~ expanded), else ~/.cache/tpi-node
      models/             prepared models (weights/prepare.py)
      shards/             per-node layer slices (weights/slicer.py)
      certs/              `tpi-node certs` output
      kernels/            the quantised-matmul kernel, compiled for this CPU (model/qkernel.py);
                          $TPI_KERNELS_DIR instead when set
      node-id.json        this machine's node ids (cluster/identity.py)

Read at call time, not at import, so a test (or a second cluster in one process) can point
TPI_HOME elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "TPI_HOME"
KERNELS_ENV = "TPI_KERNELS_DIR"


def tpi_home() -> Path:
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "tpi-node"


def models_dir() -> Path:
    return tpi_home() / "models"


def shards_dir() -> Path:
    return tpi_home() / "shards"


def certs_dir() -> Path:
    return tpi_home() / "certs"


def kernels_dir() -> Path:
    """Compiled code depends only on its source and the CPU (its file name says both), so nodes
    with different homes may share one folder: the test suite's many TPI_HOMEs compile it once."""
    shared = os.environ.get(KERNELS_ENV)
    return Path(shared).expanduser() if shared else tpi_home() / "kernels"
