"""Shared-memory lanes: the allreduce data of a worker on the master's own machine.

A local worker's session runs on the master's Unix socket (cluster/unix_session.py), and its
partial sums and the sums that come back still cost ~0.19 ms a round trip there (protobuf, the
socket and Python on both ends; scripts/bench_allreduce.py), and decode pays one per half layer:
60 a token on SmolLM2. A lane is a small file in /dev/shm that both processes map. The worker
writes a partial into the next `UP` slot and publishes it by storing the slot's sequence number;
the master reads it in place, and writes the sum into the next `DOWN` slot the same way. No
encoding, no system call, no event loop; each waiting side spins on one word, then naps.

Layout (native little-endian u64 words):

    header   MAGIC, VERSION, slot data bytes, DEPTH, taken[UP], taken[DOWN]      (one 64-byte line)
    slot     seq, step_id, stage, nbytes, then `slot bytes` of data              (2 * DEPTH of them)

Entry n of a direction lives in its slot n % DEPTH, published when that slot's seq reads n + 1.
The reader stores taken[dir] = n + 1 once it has copied entry n out; the writer of entry n first
waits for taken[dir] >= n + 1 - DEPTH (never, unless the reader is DEPTH entries behind).

What travels here: the worker's partials whose fp32 values fit a slot (decode steps and small
batches) when the wire is fp32 (another --wire is what the user chose to see on every hop), and
the master answers each partial the way it came. A bigger step (a long prompt's prefill), a
gather and every control frame stay on the session's socket; each channel keeps its own order,
and the master takes a rank's next part from whichever channel holds the key it awaits. The ordering of the words
relies on x86-64's total store order (CPython writes the data, then the seq word); other machines
do not open lanes and keep the socket.

Memory: the file is 2 x DEPTH slots of SLOT_BYTES (8 MiB), but only the pages written count in
either process's RSS: a decode step's few KiB per slot, up to a slot's MiB after a long prefill.

The worker creates the file (0600, a random name) and names it in its Hello; the master maps it
only if this user owns it and its header is right, then unlinks it: the memory lives while either
end holds its mapping.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import platform
import secrets
import struct
import time
from pathlib import Path

import torch

from tpi_node.comm.codec import FrameError
from tpi_node.comm.spin import SPIN_S
from tpi_node.errors import TpiError

UP, DOWN = 0, 1  # worker -> master (partials), master -> worker (sums)
MAGIC = int.from_bytes(b"TPILANE1", "little")
VERSION = 1
DEPTH = 4  # entries a direction may hold unread (the token split keeps 2 allreduces in flight)
SLOT_BYTES = 1 << 20  # fp32 data a slot holds: 455 tokens of hidden 576, 64 of hidden 4096
SHM_DIR = Path("/dev/shm")
_HEADER = 64
_SLOT_HEAD = 32
_WORD = struct.Struct("<Q")
_SLOT = struct.Struct("<4Q")
NAP_S = 50e-6  # between looks, once a waiting end has spun its budget (comm/spin.py)


class LaneError(TpiError):
    """A lane file that cannot be opened as one (missing, foreign, the wrong size or header)."""


def supported() -> bool:
    """Lanes rely on total store order (see above) and on a tmpfs at /dev/shm."""
    return platform.machine().lower() in ("x86_64", "amd64") and SHM_DIR.is_dir()


class Lane:
    """One end of a lane: the worker's (`create`) or the master's (`open`). Each end keeps its own
    counters of what it wrote and read; the file holds the slots and the `taken` words."""

    def __init__(self, mm: mmap.mmap, path: str, slot_bytes: int) -> None:
        self.mm, self.path, self.slot_bytes = mm, path, slot_bytes
        self.bytes = torch.frombuffer(mm, dtype=torch.uint8)  # the whole mapping, for tensor copies
        self.written = [0, 0]  # entries this end published, per direction
        self.read = [0, 0]  # entries this end consumed, per direction

    @classmethod
    def create(cls, slot_bytes: int = SLOT_BYTES) -> Lane:
        """A new lane file in /dev/shm (the worker's end)."""
        path = str(SHM_DIR / f"tpi-node-lane-{os.getpid()}-{secrets.token_hex(8)}")
        size = _HEADER + 2 * DEPTH * (_SLOT_HEAD + slot_bytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        struct.pack_into("<4Q", mm, 0, MAGIC, VERSION, slot_bytes, DEPTH)
        return cls(mm, path, slot_bytes)

    @classmethod
    def open(cls, path: str) -> Lane:
        """The master's end of the lane a worker named in its Hello; the file is unlinked here."""
        p = Path(path)
        if p.parent != SHM_DIR or not p.name.startswith("tpi-node-lane-"):
            raise LaneError(f"{path} is not a lane file")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise LaneError(f"cannot open the lane {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise LaneError(f"the lane {path} belongs to another user")
            if st.st_size < _HEADER:
                raise LaneError(f"the lane {path} has {st.st_size} bytes")
            mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):  # (another user's, in sticky /dev/shm: refused above)
                Path(path).unlink()
        magic, version, slot_bytes, depth = struct.unpack_from("<4Q", mm, 0)
        if (magic, version, depth) != (MAGIC, VERSION, DEPTH) or len(mm) != _HEADER + 2 * DEPTH * (
            _SLOT_HEAD + slot_bytes
        ):
            mm.close()
            raise LaneError(f"the lane {path} has a foreign header or size")
        return cls(mm, path, slot_bytes)

    # ---- layout -----------------------------------------------------------------------------------
    def _slot(self, direction: int, n: int) -> int:
        return _HEADER + (direction * DEPTH + n % DEPTH) * (_SLOT_HEAD + self.slot_bytes)

    def _taken(self, direction: int) -> int:
        return _WORD.unpack_from(self.mm, 32 + 8 * direction)[0]

    def fits(self, t: torch.Tensor) -> bool:
        """Whether an allreduce of `t`'s shape travels here (its fp32 values fit a slot)."""
        return t.numel() * 4 <= self.slot_bytes

    # ---- writing ----------------------------------------------------------------------------------
    def put(self, direction: int, key: tuple[int, int], t: torch.Tensor, timeout_s: float) -> None:
        """Publish `t` (any float tensor; sent as fp32) as the next entry, tagged with `key`
        (step id, stage). Waits while the reader is DEPTH entries behind (PeerLost-like TpiError
        after `timeout_s`)."""
        n = self.written[direction]
        if self._taken(direction) + DEPTH <= n:
            self._wait(lambda: self._taken(direction) + DEPTH > n, timeout_s, "a free slot")
        off = self._slot(direction, n)
        data = t.detach().to("cpu", torch.float32).contiguous().view(-1).view(torch.uint8)
        self.bytes[off + _SLOT_HEAD : off + _SLOT_HEAD + data.numel()].copy_(data)
        struct.pack_into("<3Q", self.mm, off + 8, key[0], key[1], data.numel())
        _WORD.pack_into(self.mm, off, n + 1)  # last: publishes the entry (total store order)
        self.written[direction] = n + 1

    # ---- reading ----------------------------------------------------------------------------------
    def peek(self, direction: int, step_id: int) -> tuple[int, int] | None:
        """The key (step id, stage) of the next entry if it is here, else None; entries of steps
        before `step_id` (an aborted step's) are passed over."""
        while True:
            n = self.read[direction]
            off = self._slot(direction, n)
            if _WORD.unpack_from(self.mm, off)[0] != n + 1:  # the seq word alone, first: a wider
                return None  # read may take its parts at different moments
            step, stage = struct.unpack_from("<2Q", self.mm, off + 8)
            if step >= step_id:
                return step, stage
            self._consumed(direction, n)

    def take(self, direction: int, key: tuple[int, int], shape: tuple[int, ...], what: str) -> torch.Tensor:
        """The next entry (`peek` saw it) as a new fp32 tensor of `shape`; FrameError when
        it is not `key`'s or not that size."""
        n = self.read[direction]
        off = self._slot(direction, n)
        _, step_id, stage, nbytes = _SLOT.unpack_from(self.mm, off)
        numel = math.prod(shape)
        if (step_id, stage) != key:
            raise FrameError(
                f"sent a {what} for step {step_id} stage {stage} while step {key[0]} stage {key[1]} was being "
                "reduced (on its lane)"
            )
        if nbytes != numel * 4:
            want = f"shape {list(shape)} of fp32 (expected {numel * 4})"
            raise FrameError(f"{what}: {nbytes} bytes on the lane for {want}")
        out = torch.empty(shape, dtype=torch.float32)
        out.view(-1).view(torch.uint8).copy_(self.bytes[off + _SLOT_HEAD : off + _SLOT_HEAD + nbytes])
        self._consumed(direction, n)
        return out

    def _consumed(self, direction: int, n: int) -> None:
        self.read[direction] = n + 1
        _WORD.pack_into(self.mm, 32 + 8 * direction, n + 1)

    def _wait(self, done, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        spin_until = time.perf_counter() + SPIN_S
        while not done():
            if time.monotonic() > deadline:
                raise LaneError(f"the other end of the lane left no room ({what}) within {timeout_s:g} s")
            if time.perf_counter() < spin_until:
                os.sched_yield()
            else:
                time.sleep(NAP_S)

    def close(self) -> None:
        """Unmap this end (and remove the file if the master never took it). Once only: every
        tensor this lane gave out is a copy, so nothing views the mapping after it."""
        if self.mm.closed:
            return
        Path(self.path).unlink(missing_ok=True)
        self.bytes = None
        self.mm.close()
