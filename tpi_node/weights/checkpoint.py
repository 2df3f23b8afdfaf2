"""Lazy reader of a Hugging Face checkpoint (one safetensors file or a sharded index).

Nothing is read until asked for, and a slice reads only its own rows: the master never holds the
whole model in RAM, it cuts each node's slices straight out of the memory-mapped files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from tpi_node.errors import UserError


class CheckpointReader:
    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise UserError(f"no safetensors weights in {self.dir}")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            raise UserError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.dir / fname, "pt")
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a matrix (or elements of a vector), reading only those bytes."""
        return self._file(name).get_slice(name)[start:end]

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._file(name).get_slice(name)[:, start:end]

    def close(self) -> None:
        self._handles.clear()


def model_digest(model_dir: str | Path) -> str:
    """Names a model's weights for caches: config.json plus each weight file's name, size, mtime."""
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
