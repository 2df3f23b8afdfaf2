"""Where tpi-node keeps its files, resolved in one place.

    tpi_home()            $TPI_HOME (~ expanded), else ~/.cache/tpi-node
      models/             prepared models (weights/prepare.py)
      shards/             per-node layer slices (weights/slicer.py)
      certs/              `tpi-node certs` output
      kernels/            the quantised-matmul kernel, compiled for this CPU (model/qkernel.py)
      node-id.json        this machine's node ids (cluster/identity.py)

Read at call time, not at import, so a test (or a second cluster in one process) can point
TPI_HOME elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "TPI_HOME"


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
    return tpi_home() / "kernels"
