"""ShardStore: a node's layer slices, resident or streamed from disk through a sliding window.

    with store.layer(i) as w:      # waits for the prefetcher, releases the layer afterwards
        ...                        # w is valid only inside the block

Resident (window None or >= layers): every layer is loaded once and kept. Streaming (window W):
a background thread keeps the next W layers loaded, in forward order and wrapping from the last
layer to the first (the next token starts again at layer 0), while the current one computes and
communicates; a layer is released as soon as the forward pass leaves it.

Memory while streaming is exactly W buffers ("slots") of the largest layer file, allocated once
and reused: the layer being loaded writes into the slot that the released layer left. Reusing
matters as much as releasing: first-touching fresh pages costs ~1-2 s/GB in page faults on small
machines (measured here), more than the read itself. close() returns the slots to the OS.

Healing (a ShardRepair given: a worker's files, fetched from the master with a sha256 each). A
failed read is tried once more as it is (a transient I/O error), then the file is re-fetched from
where it came from, then read once more; only that failing ends the store with a ShardError. A
file changed on disk under a running store is noticed without hashing every load (streamed
layers are re-read every token): each read compares the file's os.stat (inode, size, mtime,
ctime; any write or replace changes ctime, which user space cannot set back) before and after
the read with the stat of its verified content, and only a changed stat costs a sha256 (two
stats take ~2.5 us; hashing a 1.1 MiB SmolLM2 layer slice ~1 ms, 8x reading it from the page
cache, measured on the 2-core VM).
"""

from __future__ import annotations

import atexit
import logging
import os
import resource
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import torch

from tpi_node.heap import huge_empty
from tpi_node.model.config import ModelConfig
from tpi_node.model.layers import LayerWeights, can_prepack, prepack_pays
from tpi_node.model.quant import FORMAT_OF_BYTES, QMatrix
from tpi_node.weights.plan import NodeShare
from tpi_node.weights.shard_file import ShardChanged, ShardError, data_size, read_safetensors
from tpi_node.weights.slicer import layer_file, sha256_file
from tpi_node.weights.upload import PinnedUploader

log = logging.getLogger("tpi_node.store")

RETRY_DELAY_S = 0.2  # before reading a file again that just failed


@dataclass(frozen=True)
class ShardRepair:
    """How a store heals its files: the sha256 of each (name -> hex) and `refetch(name)`, which
    puts a good copy of that file in place (the worker fetches it from the master again) or
    raises. The store calls `refetch` only on the thread that opened it or calls layer() and
    repair() (the worker's one thread, which owns its gRPC loop), never on the prefetcher's.
    The caller vouches that the files match their sha256 when it opens the store."""

    sha256: Mapping[str, str]
    refetch: Callable[[str], None]


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class Norms:
    input: list[torch.Tensor]
    post: list[torch.Tensor]
    final: torch.Tensor


@dataclass
class StoreStats:
    """Counters since the store opened (never reset; take differences per request)."""

    window: int = 0  # layers held at once (= num_layers when resident)
    bytes_read: int = 0  # shard bytes read from disk (or the page cache)
    load_s: float = 0.0  # seconds the loads took (on the prefetch thread when streaming)
    stall_s: float = 0.0  # seconds the forward pass waited for a layer to arrive
    layers_loaded: int = 0
    restarts: int = 0  # the window jumped (a forward pass was abandoned midway)

    def as_dict(self) -> dict:
        """The counters plus this process's memory: current and peak resident set size."""
        return {**self.__dict__, "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: that one survives execve, so a child
    started from a big parent would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# Stores whose prefetcher runs. At exit each is closed (its load in flight finishes) before the
# interpreter goes: a daemon thread stopped inside a torch op aborts the process ("terminate
# called without an active exception", exit code 134), seen when a streamed load cuts slices.
_STREAMING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_streaming() -> None:
    for store in list(_STREAMING):
        store.close()


class LayerSource(Protocol):
    """What a ShardStore reads other than a folder: the same file names, answered another way
    (weights/source.py CheckpointSlices: read from the checkpoint in place)."""

    where: str  # what the messages name

    def read(self, name: str, into: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]: ...

    def data_size(self, name: str) -> int: ...

    def close(self) -> None: ...


class ShardStore:
    def __init__(
        self,
        shard_dir: Path | LayerSource,
        cfg: ModelConfig,
        share: NodeShare,
        window: int | None = None,
        device: str | torch.device = "cpu",
        repair: ShardRepair | None = None,
    ) -> None:
        # a folder of shard files, or a source that answers their names (weights/source.py: the
        # checkpoint read in place); the store closes a source when it closes
        self.source = None if isinstance(shard_dir, str | Path) else shard_dir
        self.dir = Path(shard_dir) if self.source is None else Path(self.source.where)
        self.cfg, self.share, self.device = cfg, share, torch.device(device)
        self.healing = repair
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        # file name -> os.stat key of its verified content (see the module docstring)
        names = repair.sha256 if repair else ()
        self._verified = {n: _stat_key(self.dir / n) for n in names if (self.dir / n).is_file()}
        self._wanted: str | None = None  # a file the prefetcher waits to see re-fetched
        self._refetching = False
        self._refetch_error: BaseException | None = None
        L = cfg.num_layers
        self.window = L if window is None or window >= L else max(2, window)
        self.streaming = self.window < L
        self.stats = StoreStats(window=self.window)
        # CUDA: layer files go disk -> pinned host buffer -> device on a side stream (weights/upload.py).
        self._uploader = PinnedUploader(self.device) if self.device.type == "cuda" else None
        t, nb = self._read("norms.safetensors")
        self.stats.bytes_read += nb
        t = {k: v.to(self.device) for k, v in t.items()}
        self.norms = Norms([t[f"input.{i}"] for i in range(L)], [t[f"post.{i}"] for i in range(L)], t["final"])
        self._loaded: dict[int, LayerWeights] = {}
        self._slot_of: dict[int, torch.Tensor] = {}  # layer -> the slot its tensors live in
        self._free_slots: list[torch.Tensor] = []
        self._next = 0  # next layer the prefetcher will load
        self._inflight: int | None = None  # the layer on its way in, and its window generation
        self._inflight_gen = 0
        self._gen = 0  # bumped when the window restarts at another layer
        self._error: BaseException | None = None
        self._closed = False
        if self.streaming:
            try:
                self.slot_bytes = max(self._data_size(layer_file(i)) for i in range(L))
            except OSError as e:
                raise ShardError(f"cannot read the layer files in {self.dir}: {e}") from None
            # CPU: the weights are views into the slot, so it must survive as long as they do.
            # Another device: the slot is only a staging buffer for the copy.
            pin = self._uploader is not None  # pinned: the copy to the GPU runs asynchronously
            self._free_slots = [
                torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True) if pin else huge_empty(self.slot_bytes)
                for _ in range(self.window)
            ]
            self._thread = threading.Thread(target=self._prefetch_loop, name="tpi-prefetch", daemon=True)
            self._thread.start()
            _STREAMING.add(self)
        else:
            self.slot_bytes = 0
            for i in range(L):
                self._loaded[i] = self._load(i, None)

    def _load(self, i: int, slot: torch.Tensor | None) -> LayerWeights:
        t0 = time.perf_counter()
        if self._uploader is not None:
            raw = slot if slot is not None else self._uploader.staging(self._data_size(layer_file(i)))
            t, nb = self._read(layer_file(i), raw)
            t = self._uploader.upload(raw, t)
        else:
            t, nb = self._read(layer_file(i), slot)
            t = {k: v.to(self.device) for k, v in t.items()}
        t = {k: _weight(v) for k, v in t.items()}
        g = self.cfg.q_per_kv
        w = LayerWeights(
            n_q=self.share.n_kv * g,
            n_kv=self.share.n_kv,
            wqkv=t.get("wqkv"),
            bqkv=t.get("bqkv"),
            wo=t.get("wo"),
            w13=t.get("w13"),
            w2=t.get("w2"),
        )
        mat = next((m for m in (w.w13, w.wqkv, w.wo, w.w2) if isinstance(m, torch.Tensor)), None)  # a float one
        if (
            slot is None
            and self._uploader is None
            and mat is not None
            and can_prepack(self.device, mat.dtype)
            and prepack_pays(mat)
        ):
            w = w.prepacked()  # resident on the CPU: reordered once for oneDNN (see layers.linear);
            # streamed layers stay in their reused slots as they are
        with self._cv:  # the prefetch thread and the forward pass both update stats
            self.stats.bytes_read += nb
            self.stats.load_s += time.perf_counter() - t0
            self.stats.layers_loaded += 1
        return w

    # ---- reading a file, healing it when it fails ----------------------------------------------
    def _read(self, name: str, into: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """read_safetensors of one file, retried once, then re-fetched and read once more (with a
        ShardRepair; see the module docstring). ShardError when it still fails."""
        try:
            return self._read_verified(name, into)
        except (OSError, ShardError) as e:
            err = e
        if not isinstance(err, ShardChanged):  # a transient I/O error: try once more as it is
            log.warning("reading %s failed (%s); trying again", name, err)
            time.sleep(RETRY_DELAY_S)
            try:
                return self._read_verified(name, into)
            except (OSError, ShardError) as e:
                err = e
        if self.healing is None:
            raise err if isinstance(err, ShardError) else ShardError(f"{self.dir / name}: {err}") from None
        log.warning("%s is unusable (%s); fetching it again", name, err)
        self._refetch(name)
        try:
            return self._read_verified(name, into)
        except (OSError, ShardError) as e:
            raise ShardError(f"{name} is still unusable after fetching it again: {e}") from None

    def _read_verified(self, name: str, into: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], int]:
        """Read a file whose stat is that of its verified content before and after the read (a
        changed stat is checked against the sha256 first); ShardChanged when it does not match."""
        if self.source is not None:
            return self.source.read(name, into)
        path = self.dir / name
        if self.healing is None or name not in self.healing.sha256:
            return read_safetensors(path, into)
        before = _stat_key(path)
        if before != self._verified.get(name):
            if sha256_file(path) != self.healing.sha256[name]:
                raise ShardChanged(f"{path} no longer matches its sha256 (changed on disk)")
            self._verified[name] = before  # touched, not changed (a copy with the same bytes)
        out = read_safetensors(path, into)
        if _stat_key(path) != before:
            raise ShardError(f"{path} changed on disk while it was read")
        return out

    def _refetch(self, name: str) -> None:
        """Get a good copy of `name` in place. The prefetcher asks the forward pass's thread to do
        it (repair(), called from layer() or by an idle worker) and waits."""
        if self._thread is not threading.current_thread():
            self._refetch_now(name)
            return
        with self._cv:
            self._wanted, self._refetch_error = name, None
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._wanted is None or self._closed)
            if self._closed:
                raise ShardError("the shard store is closed")
            if self._refetch_error is not None:
                raise ShardError(f"cannot fetch {name} again: {self._refetch_error}")

    def _refetch_now(self, name: str) -> None:
        try:
            self.healing.refetch(name)
        except OSError as e:
            raise ShardError(f"cannot fetch {name} again: {e}") from None
        # the next read hashes the new copy once: a bad copy fails here, not in the forward pass
        self._verified.pop(name, None)

    def repair(self) -> None:
        """Run the re-fetch the prefetcher waits for, if any (on the forward pass's thread: see
        ShardRepair). What the refetch raises is raised here too; the prefetcher then fails the
        load it waited for."""
        with self._cv:
            name = self._wanted
            if name is None or self._refetching:
                return
            self._refetching = True
        err = None
        try:
            self._refetch_now(name)
        except BaseException as e:
            err = e
            raise
        finally:
            with self._cv:
                self._wanted, self._refetching, self._refetch_error = None, False, err
                self._cv.notify_all()

    def _prefetch_loop(self) -> None:
        L = self.cfg.num_layers
        while True:
            with self._cv:
                while not self._closed and not self._free_slots:
                    self._cv.wait()
                if self._closed:
                    return
                i, gen, slot = self._next, self._gen, self._free_slots.pop()
                self._next, self._inflight, self._inflight_gen = (i + 1) % L, i, gen
            try:
                w = self._load(i, slot)
            except BaseException as e:  # surfaced to the forward pass that waits for it
                with self._cv:
                    self._error, self._inflight = e, None
                    self._free_slots.append(slot)
                    self._cv.notify_all()
                return
            with self._cv:
                self._inflight = None
                if gen == self._gen and not self._closed:  # the window was not restarted meanwhile
                    self._loaded[i], self._slot_of[i] = w, slot
                else:
                    self._free_slots.append(slot)
                self._cv.notify_all()

    def _release(self, i: int) -> None:
        """Caller holds _cv: layer i leaves the window, its slot goes back to the prefetcher."""
        if self._loaded.pop(i, None) is not None:
            self._free_slots.append(self._slot_of.pop(i))

    @contextmanager
    def layer(self, i: int):
        if not self.streaming:
            yield self._loaded[i]
            return
        t0 = time.perf_counter()
        with self._cv:
            if self._closed:
                raise ShardError("the shard store is closed")
            coming = i == self._inflight and self._inflight_gen == self._gen
            if not (i in self._loaded or coming or (i == self._next and self._free_slots)):
                # out of order (a forward pass was abandoned midway): restart the window at i
                for j in list(self._loaded):
                    self._release(j)
                self._next, self._gen = i, self._gen + 1
                self.stats.restarts += 1
                self._cv.notify_all()
        while True:
            with self._cv:
                while i not in self._loaded and not (self._wanted is not None and not self._refetching):
                    if self._error is not None:
                        raise ShardError(f"loading layer {i} failed: {self._error}")
                    if self._closed:
                        raise ShardError("the shard store is closed")
                    self._cv.wait()
                if i in self._loaded:
                    w = self._loaded[i]
                    self.stats.stall_s += time.perf_counter() - t0
                    break
            self.repair()  # the prefetcher waits for a file only this thread may fetch again
        try:
            yield w
        finally:
            with self._cv:
                self._release(i)
                self._cv.notify_all()

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until the prefetcher is idle (its window is full); True if it got there in time."""
        if not self.streaming:
            return True
        with self._cv:
            return self._cv.wait_for(
                lambda: (
                    self._closed
                    or self._error is not None
                    or self._wanted is not None
                    or (self._inflight is None and not self._free_slots)
                ),
                timeout,
            )

    def sample_matrices(self) -> list[QMatrix]:
        """This node's quantised matrices of layer 0 (what the kernel tuning measures on), none
        when its slices are float. Read from the file when the layers stream."""
        if self.streaming:
            t, _ = self._read(layer_file(0))
            mats = [_weight(v) for v in t.values()]
        else:
            w = self._loaded[0]
            mats = [w.wqkv, w.wo, w.w13, w.w2]
        return [m for m in mats if isinstance(m, QMatrix)]

    def in_memory(self) -> int:
        """Layers held now, the one being loaded included (never more than the window)."""
        with self._cv:
            return len(self._loaded) + (self._inflight is not None)

    def resident_bytes(self) -> int:
        """Bytes of weights this store holds: the slots when streaming, every layer when resident."""
        with self._cv:
            if self.streaming:
                return self.window * self.slot_bytes
            return sum(w.nbytes() for w in self._loaded.values())

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._loaded.clear()
            self._slot_of.clear()
            self._free_slots.clear()
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)  # it finishes the load in flight, then sees _closed
        if self.source is not None:
            self.source.close()

    def _data_size(self, name: str) -> int:
        """Bytes of a layer file's tensors: what a slot for it must hold."""
        return self.source.data_size(name) if self.source is not None else data_size(self.dir / name)


def _weight(t: torch.Tensor) -> torch.Tensor | QMatrix:
    """A stored tensor as the forward pass uses it: U8 [N, K/32, block bytes] is a QMatrix."""
    if t.dtype == torch.uint8 and t.dim() == 3 and t.shape[-1] in FORMAT_OF_BYTES:
        return QMatrix(t)
    return t
