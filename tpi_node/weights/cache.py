"""The shard cache on disk: slice sets named by what they hold, leases, least-recently-used eviction.

    $TPI_HOME/shards/<model digest[:12]>/<dtype[-quant]>/
        kv0-3.ffn0-2720/          a slice set: one node's share of every layer (layer-*.safetensors,
                                  norms.safetensors; MANIFEST where a master sliced it)
        kv0-3.ffn0-2720.lock      its lease file: every process using the set holds a shared flock
                                  on it; its mtime is the set's last use

A set is named by its content (model, dtype, --quant, the KV-head and FFN-column ranges), not
by the plan: two plans that give a node the same ranges share one set, a master and a worker on
one machine share the set of that worker's share, and a node whose share changed finds its old
set by its ranges and cuts the units it keeps out of it (weights/slicer.py read_part).

Leases. `hold(set_dir)` takes a shared flock on the set's lease file for as long as the process
uses the set (a master: every set of the plan in force; a worker: the set it serves from, until
it has fetched the next one). The kernel drops the lock when the process dies, even by kill -9, so
a crashed process never pins a set. Eviction takes the lock exclusively without waiting: a set
someone holds is in use and is never removed.

Bounds. With `--cache-size SIZE`, a process about to write a set first evicts unused sets, least
recently used first, until what is there plus what it will write fits in SIZE, and trims again
when it stops using a set. Sets in use are never evicted, so a cache whose sets are all in use may
stand above SIZE until they are released (said in the log). `tpi-node cache list|prune` show and
prune it by hand (commands/cache.py). Folders of the layout before sets (named by plan digest:
<model>/<plan>-<kind>/rank-N; nothing reads them any more) are listed and evicted like sets, their
folder's time as their last use.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tpi_node.paths import shards_dir
from tpi_node.units import format_size

log = logging.getLogger("tpi_node.cache")

Span = tuple[int, int]  # [start, end) of KV-head groups or FFN columns
_NAME = re.compile(r"^kv(\d+)-(\d+)\.ffn(\d+)-(\d+)$")
_LEGACY = re.compile(r"^rank-\d+(-worker)?$")  # shards/<model>/<plan digest>-<kind>/rank-N: before sets
LOCK_SUFFIX = ".lock"
MODEL_FILE = "MODEL"  # the model's name, for `cache list`


def kind_name(dtype: str, quant: str = "none") -> str:
    """A cache for another dtype or --quant is another folder: never reused by mistake."""
    return dtype if quant == "none" else f"{dtype}-{quant}"


def set_dir(model_digest: str, dtype: str, quant: str, kv: Span, ffn: Span) -> Path:
    return shards_dir() / model_digest[:12] / kind_name(dtype, quant) / f"kv{kv[0]}-{kv[1]}.ffn{ffn[0]}-{ffn[1]}"


def spans_of(path: Path) -> tuple[Span, Span] | None:
    """(kv, ffn) of a set folder, None when the name is not a set's."""
    m = _NAME.match(path.name)
    return None if m is None else ((int(m[1]), int(m[2])), (int(m[3]), int(m[4])))


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


def label(path: Path, model_name: str) -> None:
    """Record the model's name in a set (shown by `cache list`)."""
    f = path / MODEL_FILE
    if model_name and not f.is_file():
        path.mkdir(parents=True, exist_ok=True)
        f.write_text(model_name + "\n")


# ---- leases --------------------------------------------------------------------------------------
_held: dict[Path, list] = {}  # set dir -> [lease file fd, holders in this process]
_held_lock = threading.Lock()


class Lease:
    """This process uses a set: nobody evicts it until every lease on it is released."""

    def __init__(self, path: Path) -> None:
        self.path, self.released = path, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        with _held_lock:
            entry = _held.get(self.path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self.path]
                _touch(lock_path(self.path))  # last use: when it stopped being used
                os.close(entry[0])


def hold(path: Path) -> Lease:
    """Lease the set at `path` (it need not exist yet: take the lease before writing it)."""
    path = Path(path)
    with _held_lock:
        entry = _held.get(path)
        if entry is None:
            entry = _held[path] = [_lock_shared(lock_path(path)), 0]
        entry[1] += 1
    _touch(lock_path(path))
    return Lease(path)


def release_all(but: Path | None = None) -> None:
    """Drop every lease of this process except on `but` (a worker moving to its next set)."""
    with _held_lock:
        gone = [p for p in _held if p != but]
        for p in gone:
            fd, _ = _held.pop(p)
            _touch(lock_path(p))
            os.close(fd)


def _lock_shared(lock: Path) -> int:
    """A shared flock on `lock`, on the file that is at that path when we have it (an eviction
    unlinks the file while it holds it exclusively; whoever waited on the old file tries again)."""
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a sweep removed the empty folder meanwhile
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _touch(p: Path) -> None:
    try:
        os.utime(p)
    except FileNotFoundError:
        pass


# ---- what is there -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedSet:
    path: Path
    model_digest: str  # its first 12 hex digits (the folder name)
    kind: str  # dtype[-quant]
    kv: Span | None  # None: a folder of the layout before sets (shards/<model>/<plan>-<kind>/rank-N)
    ffn: Span | None
    size: int  # bytes of its files
    last_used: float  # unix time
    model_name: str = ""  # as its writer recorded it

    @property
    def dtype(self) -> str:
        return self.kind.partition("-")[0]

    @property
    def quant(self) -> str:
        return self.kind.partition("-")[2] or "none"

    def in_use(self) -> bool:
        """A process holds a lease on it (this one included)."""
        try:
            fd = os.open(lock_path(self.path), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def _name(path: Path) -> str:
    try:
        return (path / MODEL_FILE).read_text().strip()
    except OSError:
        return ""


def _last_used(path: Path) -> float:
    for p in (lock_path(path), path):
        try:
            return p.stat().st_mtime
        except FileNotFoundError:
            pass
    return 0.0


def list_sets(root: Path | None = None) -> list[CachedSet]:
    """Every set in the cache, least recently used first."""
    root = root or shards_dir()
    out = []
    for kind_dir in root.glob("*/*"):
        if not kind_dir.is_dir():
            continue
        for p in kind_dir.iterdir():
            spans, kind = spans_of(p), kind_dir.name
            if spans is None and _LEGACY.match(p.name):  # named by plan: only `cache prune` uses it now
                spans, kind = (None, None), kind.partition("-")[2]
            if spans is None or not p.is_dir():
                continue
            out.append(CachedSet(p, kind_dir.parent.name, kind, *spans, dir_bytes(p), _last_used(p), _name(p)))
    return sorted(out, key=lambda s: s.last_used)


def cache_bytes(root: Path | None = None) -> int:
    """Bytes of every file under the cache (sets, and anything half-written or half-removed)."""
    root = root or shards_dir()
    return dir_bytes(root) if root.is_dir() else 0


def donors(model_digest: str, dtype: str, quant: str, but: Path) -> list[tuple[Path, Span, Span]]:
    """The other sets of this model, dtype and --quant: (folder, kv, ffn) each, whose files a
    node whose share changed can cut the units it keeps from."""
    kind_dir = shards_dir() / model_digest[:12] / kind_name(dtype, quant)
    if not kind_dir.is_dir():
        return []
    found = ((p, spans_of(p)) for p in kind_dir.iterdir() if p != but and p.is_dir())
    return [(p, *spans) for p, spans in found if spans is not None]


# ---- eviction --------------------------------------------------------------------------------------
def evict(path: Path) -> bool:
    """Remove the set at `path` when nobody uses it; False (and nothing removed) when in use."""
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # its model folder went away meanwhile
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:
                return False  # someone else evicted it and a new lease file took its place
        except FileNotFoundError:
            return False
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            trash = None
        os.unlink(lock)  # while we hold it: a waiting hold() sees the file gone and starts afresh
    finally:
        os.close(fd)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return True


def _sweep(root: Path) -> None:
    """Leftovers: a removal cut short (.trash-*), lease files of sets that are not there, empty folders."""
    for kind_dir in root.glob("*/*"):
        if not kind_dir.is_dir():
            continue
        for p in kind_dir.iterdir():
            if p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.endswith(LOCK_SUFFIX) and not p.with_name(p.name[: -len(LOCK_SUFFIX)]).exists():
                evict(p.with_name(p.name[: -len(LOCK_SUFFIX)]))
        for d in (kind_dir, kind_dir.parent):
            try:
                d.rmdir()  # only when empty
            except OSError:
                pass


def _evict_lru(limit: int, need: int, root: Path) -> tuple[list[CachedSet], int]:
    """Evict unused sets, least recently used first, until the cache plus `need` fits in
    `limit`. -> (the sets removed, the bytes left)."""
    total, removed = cache_bytes(root), []
    for s in list_sets(root):
        if total + need <= limit:
            break
        if evict(s.path):
            total -= s.size
            removed.append(s)
    _sweep(root)
    return removed, total


def make_room(limit: int | None, need: int = 0, root: Path | None = None) -> list[CachedSet]:
    """Evict unused sets, least recently used first, until the cache plus `need` more bytes fits
    in `limit` (None: no bound, nothing happens). -> the sets removed."""
    root = root or shards_dir()
    if limit is None or not root.is_dir():
        return []
    removed, total = _evict_lru(limit, need, root)
    if removed:
        log.info(
            "shard cache: removed %d least recently used set(s) (%s) to stay within %s",
            len(removed),
            format_size(sum(s.size for s in removed)),
            format_size(limit),
        )
    if total + need > limit:
        log.warning(
            "shard cache: %s%s is over --cache-size %s; the rest is in use and stays until released",
            format_size(total),
            f" + {format_size(need)} to write" if need else "",
            format_size(limit),
        )
    return removed


def prune(keep: int | None, root: Path | None = None) -> list[CachedSet]:
    """`cache prune`: evict unused sets, least recently used first, down to `keep` bytes (None:
    every unused set)."""
    root = root or shards_dir()
    if not root.is_dir():
        return []
    if keep is not None:
        return _evict_lru(keep, 0, root)[0]
    removed = [s for s in list_sets(root) if evict(s.path)]
    _sweep(root)
    return removed
