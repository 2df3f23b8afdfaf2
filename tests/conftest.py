"""Shared fixtures: the real default model (prepared once, cached in the user's TPI_HOME) and
tiny synthetic models by preset (written once per session into a temp dir)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tpi_node.weights.prepare import prepare_model
from tpi_node.weights.synth import synthesize

# The suite runs on 2 cores next to servers and workers of its own.
torch.set_num_threads(2)

_tiny_root: Path | None = None
_tiny_made: dict[tuple, Path] = {}


def tiny_model_dir(preset: str = "tiny-llama", layers: int | None = None, dtype: str = "fp32", seed: int = 0) -> Path:
    """A synthesized model directory (config.json, sharded safetensors, tokenizer), written
    once per test session and argument set. Plain function, so helpers may import it; the
    fixture of the same name returns it."""
    global _tiny_root
    key = (preset, layers, dtype, seed)
    if key not in _tiny_made:
        if _tiny_root is None:
            _tiny_root = Path(tempfile.mkdtemp(prefix="tpi-tiny-models-"))
            atexit.register(shutil.rmtree, _tiny_root, True)
        out = _tiny_root / f"{preset}-{layers}-{dtype}-{seed}"
        _tiny_made[key] = synthesize(preset, out, layers=layers, dtype=dtype, seed=seed, progress=False)
    return _tiny_made[key]


@pytest.fixture(name="tiny_model_dir", scope="session")
def _tiny_model_dir_fixture():
    """Factory: tiny_model_dir("tiny-qwen2", layers=2) -> Path."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model as `tpi-node prepare` leaves it ($TPI_HOME or ~/.cache/tpi-node);
    converted on first use, returned at once afterwards."""
    return prepare_model(progress=False)
