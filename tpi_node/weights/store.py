"""ShardStore: a node's layer slices, resident or streamed from disk through a sliding window.

    with store.layer(i) as w:      # waits for the prefetcher, releases the layer afterwards
        ...

Resident (window None or >= layers): every layer is loaded once and kept. Streaming (window W):
a background thread keeps the next W layers loaded, in forward order and wrapping from the last
layer to the first (the next token starts again at layer 0), while the current one computes and
communicates; a layer is dropped as soon as the forward pass leaves it, so its memory returns to
the operating system (one large buffer per layer file, freed whole).
"""
from __future__ import annotations

import json
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi_node.model.config import ModelConfig
from tpi_node.model.layers import LayerWeights
from tpi_node.weights.plan import NodeShare
from tpi_node.weights.slicer import layer_file

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


class ShardError(RuntimeError):
    pass


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Read a safetensors file into ONE anonymous buffer; tensors are views into it.

    Returns (tensors, bytes read). Freeing the tensors frees the buffer whole, so the memory
    really goes back to the OS (unlike an mmap'd file, which stays in the page cache and RSS).
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ShardError(f"{path}: truncated shard file")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ShardError(f"{path}: corrupt shard header") from None
        header.pop("__metadata__", None)
        size = max((v["data_offsets"][1] for v in header.values()), default=0)
        buf = bytearray(size)
        if f.readinto(buf) != size:
            raise ShardError(f"{path}: truncated shard file")
    raw = torch.frombuffer(buf, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, meta in header.items():
        a, b = meta["data_offsets"]
        out[name] = raw[a:b].view(_ST_DTYPES[meta["dtype"]]).view(meta["shape"])
    return out, 8 + n + size


@dataclass
class Norms:
    input: list[torch.Tensor]
    post: list[torch.Tensor]
    final: torch.Tensor


@dataclass
class StoreStats:
    bytes_read: int = 0
    load_s: float = 0.0
    stall_s: float = 0.0
    layers_loaded: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ShardStore:
    def __init__(self, shard_dir: Path, cfg: ModelConfig, share: NodeShare, window: int | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.dir, self.cfg, self.share, self.device = Path(shard_dir), cfg, share, torch.device(device)
        L = cfg.num_layers
        self.window = L if window is None or window >= L else max(2, window)
        self.streaming = self.window < L
        self.stats = StoreStats()
        t, nb = read_safetensors(self.dir / "norms.safetensors")
        self.stats.bytes_read += nb
        t = {k: v.to(self.device) for k, v in t.items()}
        self.norms = Norms([t[f"input.{i}"] for i in range(L)], [t[f"post.{i}"] for i in range(L)], t["final"])
        self._loaded: dict[int, LayerWeights] = {}
        self._cv = threading.Condition()
        self._next = 0            # next layer the prefetcher will load
        self._inflight: int | None = None
        self._gen = 0             # bumped when the window restarts at another layer
        self._error: BaseException | None = None
        self._closed = False
        if self.streaming:
            self._thread = threading.Thread(target=self._prefetch_loop, name="tpi-prefetch", daemon=True)
            self._thread.start()
        else:
            for i in range(L):
                self._loaded[i] = self._load(i)

    def _load(self, i: int) -> LayerWeights:
        t0 = time.perf_counter()
        t, nb = read_safetensors(self.dir / layer_file(i))
        t = {k: v.to(self.device) for k, v in t.items()}
        g = self.cfg.q_per_kv
        w = LayerWeights(n_q=self.share.n_kv * g, n_kv=self.share.n_kv, wqkv=t.get("wqkv"), bqkv=t.get("bqkv"),
                         wo=t.get("wo"), w13=t.get("w13"), w2=t.get("w2"))
        self.stats.bytes_read += nb
        self.stats.load_s += time.perf_counter() - t0
        self.stats.layers_loaded += 1
        return w

    def _prefetch_loop(self) -> None:
        L = self.cfg.num_layers
        while True:
            with self._cv:
                while not self._closed and len(self._loaded) >= self.window:
                    self._cv.wait()
                if self._closed:
                    return
                i, gen = self._next, self._gen
                self._next, self._inflight = (i + 1) % L, i
            try:
                w = self._load(i)
            except BaseException as e:  # surfaced to the forward pass that waits for it
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._inflight = None
                if gen == self._gen:        # the window was not restarted meanwhile
                    self._loaded[i] = w
                self._cv.notify_all()

    @contextmanager
    def layer(self, i: int):
        if not self.streaming:
            yield self._loaded[i]
            return
        t0 = time.perf_counter()
        with self._cv:
            if i not in self._loaded and i != self._inflight and i != self._next or (
                    i not in self._loaded and len(self._loaded) >= self.window):
                # out of order (a forward pass was abandoned midway): restart the window at i
                self._loaded.clear()
                self._next, self._gen = i, self._gen + 1
                self._cv.notify_all()
            while i not in self._loaded:
                if self._error is not None:
                    raise ShardError(f"loading layer {i} failed: {self._error}")
                self._cv.wait()
            w = self._loaded[i]
        self.stats.stall_s += time.perf_counter() - t0
        try:
            yield w
        finally:
            with self._cv:
                self._loaded.pop(i, None)
                self._cv.notify_all()

    def resident_bytes(self) -> int:
        with self._cv:
            return sum(w.nbytes() for w in self._loaded.values())

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._loaded.clear()
            self._cv.notify_all()
