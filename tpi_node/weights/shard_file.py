"""One shard file (safetensors) read into memory the store controls, and the errors of shard files.

tensors, nbytes = read_safetensors(path, into=slot)   # views into `slot` (or a fresh buffer)
data_size(path)                                        # what a slot for it must hold
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from tpi_node.dtypes import SAFETENSORS
from tpi_node.errors import TpiError
from tpi_node.heap import huge_empty


class ShardError(TpiError):
    """A shard file is missing, truncated or corrupt, or the store is closed."""


class ShardChanged(ShardError):
    """A shard file no longer matches its sha256 (reading it again would not help)."""


def _read_header(f, path: Path) -> tuple[dict, int]:
    """(tensor table, size of the data section) of an open safetensors file, left at the data."""
    head = f.read(8)
    if len(head) != 8:
        raise ShardError(f"{path}: truncated shard file")
    (n,) = struct.unpack("<Q", head)
    try:
        header = json.loads(f.read(n))
    except ValueError:
        raise ShardError(f"{path}: corrupt shard header") from None
    header.pop("__metadata__", None)
    return header, max((v["data_offsets"][1] for v in header.values()), default=0)


def data_size(path: Path) -> int:
    """Bytes of a safetensors file's tensor data (what a buffer for it must hold)."""
    with open(path, "rb") as f:
        return _read_header(f, path)[1]


def read_safetensors(path: Path, into: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Read a safetensors file into ONE buffer; tensors are views into it.

    `into`: a uint8 buffer to reuse (at least the data size), else a fresh one is allocated.
    Returns (tensors, bytes read). Unlike an mmap'd file, the bytes live in anonymous memory the
    store controls: reused for the next layer or freed whole.
    """
    with open(path, "rb", buffering=0) as f:
        header, size = _read_header(f, path)
        if into is not None and into.numel() < size:
            raise ShardError(f"{path}: {size} bytes of tensors do not fit the {into.numel()}-byte slot")
        raw = into[:size] if into is not None else huge_empty(size)
        view, got = memoryview(raw.numpy()), 0
        while got < size:  # raw reads may return short; loop to the end
            n = f.readinto(view[got:])
            if not n:
                raise ShardError(f"{path}: truncated shard file")
            got += n
        total = f.tell()
    out = {}
    for name, meta in header.items():
        a, b = meta["data_offsets"]
        out[name] = raw[a:b].view(SAFETENSORS[meta["dtype"]]).view(meta["shape"])
    return out, total
