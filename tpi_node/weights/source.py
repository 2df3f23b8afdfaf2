"""Rank 0's layers read in place: a virtual shard folder over the checkpoint itself.

A worker's ShardStore reads the files of its shard cache (what it fetched from the master). The
master's own slice, and a one-node run, have the checkpoint at hand, so `CheckpointSlices`
answers the same file names ("norms.safetensors", "layer-003.safetensors") from the checkpoint:
nothing is copied to disk. Each of a layer's tensors is copied piece by piece (the slicing table,
weights/slicer.py layer_parts) from the checkpoint straight into the store's slot: rows as they
are stored are read from the file as a shard file is, columns, a GGUF's permuted q / k rows and
casts to --dtype come from its mapping. One copy, and no scratch memory. Resident
layers are read once at start, streamed ones on every load. After each read the checkpoint's
mapped pages are let go (`release_pages`), so a streaming node's RSS holds its window, not the
parts of the file it has read. A layer the table cannot copy as it is (a GGUF whose q, k and v
differ in format, which the slicer turns into floats) is cut as the slicer cuts it, then copied.

The one exception (`in_place`): float weights that --quant quantises. Quantising runs at about
0.2 GB/s of fp32 on a CPU (measured here: a 4096x4096 matrix to int4 in 0.32 s), ten times
slower than reading a file, and would run again at every start (and on every streamed load);
such a rank keeps its quantised slices in the shard cache, a fraction of the checkpoint's size.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tpi_node.dtypes import torch_dtype
from tpi_node.heap import huge_empty
from tpi_node.model.config import ModelConfig
from tpi_node.model.quant import BLOCK, BLOCK_BYTES
from tpi_node.weights.checkpoint import open_checkpoint
from tpi_node.weights.plan import NodeShare
from tpi_node.weights.shard_file import ShardError
from tpi_node.weights.sizes import LAYER_SAMPLE
from tpi_node.weights.slicer import MATRICES, Part, layer_file, layer_parts, read_norms, slice_layer, stored_layer

ALIGN = 64  # byte offset of each tensor in a slot: every dtype's view is aligned
NORMS = "norms.safetensors"


def in_place(model_dir: str | Path, quant: str) -> bool:
    """True unless --quant would quantise float layer weights on every start (see above)."""
    if quant == "none":
        return True
    reader = open_checkpoint(model_dir)
    try:
        return reader.block_format(LAYER_SAMPLE) is not None  # stored blocks stay as they are
    finally:
        reader.close()


@dataclass(frozen=True)
class Piece:
    """One tensor of a layer as stored: its dtype, shape and where it sits in the slot."""

    key: str  # "wqkv", ...
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _aligned(at: int) -> int:
    return -(-at // ALIGN) * ALIGN


class CheckpointSlices:
    """One rank's shard files, read from the checkpoint (a ShardStore source)."""

    def __init__(self, model_dir: str | Path, cfg: ModelConfig, share: NodeShare, dtype: str, quant: str) -> None:
        self.where = f"{model_dir} (read in place)"
        self.cfg, self.share, self.dtype, self.quant = cfg, share, torch_dtype(dtype), quant
        self.reader = open_checkpoint(model_dir)
        self._lock = threading.Lock()  # the prefetcher and the forward pass's thread both read
        self._layer = {layer_file(i): i for i in range(cfg.num_layers)}
        # each layer's pieces in the slot, or None where it is cut first (_cut)
        self._layouts: dict[int, list[Piece] | None] = {i: self._layout(i) for i in range(cfg.num_layers)}
        self._sizes = {i: self._size(i) for i in range(cfg.num_layers)}

    # ---- where each tensor goes --------------------------------------------------------------------
    def _layout(self, i: int) -> list[Piece] | None:
        """The stored form of layer i from the checkpoint's table alone (shapes and formats, no
        data read); None when a tensor is not a plain copy of its pieces."""
        r, out, at = self.reader, [], 0
        for key, parts in layer_parts(self.cfg, self.share, i).items():
            fmts = {r.block_format(name) for name, *_ in parts}
            if len(fmts) != 1:
                return None  # mixed formats: the slicer dequantises them
            fmt, (name, how, a, b) = fmts.pop(), parts[0]
            shape = r.shape(name)
            if how == "rows":
                shape = [sum(e - s for _, _, s, e in parts), *shape[1:]]
            else:
                shape = [shape[0], b - a]
            if fmt is not None:
                if how == "cols" and (a % BLOCK or b % BLOCK):
                    return None
                dtype, shape = torch.uint8, [shape[0], shape[1] // BLOCK, BLOCK_BYTES[fmt]]
            elif key in MATRICES and self.quant != "none" and shape[1] % BLOCK == 0:
                return None  # --quant would quantise it
            else:
                dtype = self.dtype
            piece = Piece(key, dtype, tuple(shape), _aligned(at), tuple(parts))
            out.append(piece)
            at = piece.offset + piece.nbytes
        return out

    def _size(self, i: int) -> int:
        pieces = self._layouts[i]
        if pieces is None:
            return _packed_size(self._cut(i))
        return max((p.offset + p.nbytes for p in pieces), default=0)

    # ---- reading --------------------------------------------------------------------------------------
    def data_size(self, name: str) -> int:
        """Bytes of a layer's tensors packed in a slot (norms are read whole, never into one)."""
        return self._sizes[self._layer[name]]

    def read(self, name: str, into: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """(tensors, bytes) of one virtual file, in `into` (a uint8 slot) or a buffer of its own."""
        if name == NORMS:
            with self._lock:
                try:
                    t = {k: v.to(self.dtype) for k, v in read_norms(self.reader, self.cfg).items()}
                finally:
                    self.reader.release_pages()
            return t, sum(v.numel() * v.element_size() for v in t.values())
        i = self._layer[name]
        size = self._sizes[i]
        if into is None:
            into = huge_empty(size)
        elif into.numel() < size:
            raise ShardError(f"{name} of {self.where} takes {size} bytes; its slot holds {into.numel()}")
        pieces = self._layouts[i]
        if pieces is None:
            return _pack(self._cut(i), into), size
        with self._lock:
            try:
                out = {p.key: self._fill(p, into) for p in pieces}
            finally:
                self.reader.release_pages()
        return out, size

    def _fill(self, p: Piece, into: torch.Tensor) -> torch.Tensor:
        """Copy a tensor's pieces from the checkpoint into its place in `into`: rows stored as
        they are read from the file like a shard file's (no page mapped); columns, permuted rows
        and casts copied from the mapped file."""
        dest = into[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape)
        row = 0
        for name, how, a, b in p.parts:
            stored = self.reader.location(name)  # None: repacked when read (a K-quant)
            if how == "rows" and stored is None:  # only this node's rows are read and repacked
                _copy(dest[row : row + b - a], self.reader.rows(name, a, b).data)
                row += b - a
                continue
            view, index = self.reader.mapped(name)
            if how == "cols" and (a, b) == (0, view.shape[1] * (BLOCK if view.dim() == 3 else 1)):
                how, a, b = "rows", 0, view.shape[0]  # every column (a one-node run): all rows
            if how == "rows" and index is None and view.dtype == dest.dtype and stored is not None:
                path, at, row_bytes = stored
                start = p.offset + row * row_bytes
                _read_into(path, at + a * row_bytes, into[start : start + (b - a) * row_bytes])
                row += b - a
                continue
            if how == "cols":  # o_proj / down_proj: rows stored as they are
                if view.dim() == 3:  # blocks: cut at whole blocks
                    a, b = a // BLOCK, b // BLOCK
                _copy(dest, view[:, a:b])
                continue
            d = dest[row : row + b - a]
            _copy(d, view[a:b] if index is None else view, None if index is None else index[a:b])
            row += b - a
        return dest

    def _cut(self, i: int) -> dict[str, torch.Tensor]:
        with self._lock:
            try:
                return stored_layer(slice_layer(self.reader, self.cfg, self.share, i), self.dtype, self.quant)
            finally:
                self.reader.release_pages()

    def close(self) -> None:
        self.reader.close()


def _copy(dest: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """dest = src (or src's `rows`, gathered), cast to dest's dtype. numpy where it can: torch's
    copy of a strided uint8 block view, or a gather into `out=`, runs ~1000x slower here (15 ms
    for a 0.2 MB slice of SmolLM2's down_proj)."""
    if dest.dtype == src.dtype and dest.dtype != torch.bfloat16:  # numpy has no bfloat16
        if rows is None:
            np.copyto(dest.numpy(), src.numpy())
        else:
            np.take(src.numpy(), rows.numpy(), axis=0, out=dest.numpy())
    else:
        dest.copy_(src if rows is None else src[rows])


def _read_into(path: Path, offset: int, buf: torch.Tensor) -> None:
    """Bytes [offset, offset + len(buf)) of a file into a uint8 tensor."""
    view, got = memoryview(buf.numpy()), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while got < len(view):  # raw reads may return short
            n = f.readinto(view[got:])
            if not n:
                raise ShardError(f"{path}: truncated at byte {offset + got}")
            got += n


def _packed_size(tensors: dict[str, torch.Tensor]) -> int:
    at = 0
    for t in tensors.values():
        at = _aligned(at) + t.numel() * t.element_size()
    return at


def _pack(tensors: dict[str, torch.Tensor], into: torch.Tensor) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for k, v in tensors.items():
        at = _aligned(at)
        n = v.numel() * v.element_size()
        out[k] = into[at : at + n].view(v.dtype).view(v.shape)
        out[k].copy_(v)
        at += n
    return out
