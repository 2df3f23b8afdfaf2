"""Shared fixtures: the real default model (prepared once, cached in the user's TPI_HOME) and
tiny synthetic models by preset (written once per session into a temp dir)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from tpi_node.paths import KERNELS_ENV, kernels_dir
from tpi_node.weights.prepare import prepare_model
from tpi_node.weights.synth import synthesize

# The suite runs on 2 cores next to servers and workers of its own.
torch.set_num_threads(2)
# Tests give nodes homes of their own (TPI_HOME); the compiled kernel is built once for all of them
# (~0.6 s a build), in this user's home, as `make install` builds it. Workers inherit it.
os.environ.setdefault(KERNELS_ENV, str(kernels_dir()))

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
    """The default model as `tpi-node prepare` leaves it ($TPI_HOME or ~/.cache/tpi-node): its
    Q4_1 GGUF (model.gguf) with config and tokenizer files; prepared on first use."""
    return prepare_model(progress=False)


@pytest.fixture(scope="session")
def smollm2_fp32_dir(smollm2_dir, tmp_path_factory) -> Path:
    """The default model as an fp32 Hugging Face directory: its GGUF dequantised by our reader."""
    from safetensors.torch import save_file

    from tpi_node.model.quant import QMatrix
    from tpi_node.weights.checkpoint import open_checkpoint

    out = tmp_path_factory.mktemp("smollm2-fp32")
    reader = open_checkpoint(smollm2_dir)
    state = {}
    for name in reader.names():
        w = reader.get(name)
        state[name] = (w.dequantize() if isinstance(w, QMatrix) else w.float()).contiguous()
    save_file(state, str(out / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / f, out / f)
    return out


SMOLLM2_GGUF = "model.gguf"  # what transformers loads with gguf_file= from smollm2_dir


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """The reference: transformers' own model from the same GGUF (it dequantises the blocks), fp32."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    ).eval()


@pytest.fixture(autouse=True)
def _exact_kernel_after_each_test():
    """--act-quant is process state (the kernel's TUNING, set where a node starts): a test that
    started an in-process master or engine with int8 activations leaves the exact kernel behind."""
    yield
    from tpi_node.model.qkernel import use_act_quant

    use_act_quant("none")
