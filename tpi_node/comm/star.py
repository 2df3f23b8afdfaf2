"""The star allreduce: every worker sends its partial to the master, the master sums them with
its own (fp32) and sends the sum back. Two hops, which is what wins when link latency dominates
(TPI-LLM).

This module is the data plane only. Frames ride on each worker's Session stream; who is
connected, heartbeats and shutdowns belong to the cluster layer (cluster/sessions.py), which
hands the hub every Partial frame (`deliver`) and tells it when a link is gone (`link_lost`).
The hub reaches the workers through the narrow `HubLinks` interface the session layer provides.

Every allreduce is tagged (step id, stage); stage = 0, 1, 2, ... within a step, so a stale or
out-of-order frame is detected. A peer that disconnects, or sends nothing within `timeout_s`,
raises `PeerLost` on the master within that time (default 5 s).

Async form (the token split, engine/runner.py): `allreduce_start` sends this node's partial (the
master keeps its own as the sum's start) and returns; `allreduce_wait` gives the sum. Two or more
may be in flight: every worker sends in start order, the master reduces and answers in that
order, so each stream's frames arrive in key order and any other key is refused. No side waits
for a write to complete (gRPC completes it a wake-up later): the write is handed over, and the
time goes to computing or to waiting for the next frame.

Transport cost on loopback (576 floats, 2 processes, 2-core VM, `scripts/bench_allreduce.py
--breakdown`): ~0.75 ms a round trip, where the same gRPC stream echoing prebuilt frames takes
~0.25 ms; each hop ~0.2 ms (gRPC's core thread, its poller thread, then this event loop: two
wake-ups a frame), and ~0.1 ms of Python per side and direction (codec, sum, an event-loop run).
Earlier choices, same bench: grpc.aio + uvloop beat plain asyncio (~25%), sync gRPC with queue
hand-offs (~2x) and unary calls (~2x). Workers on the master's machine skip gRPC's threads: their
sessions run on a Unix socket (cluster/unix_session.py; ~0.1 ms a round trip), whose frames the
hub reads while it waits through `HubLinks.poll`, spinning before it sleeps on the loop. Their
small partial sums skip the socket too: each rides on the worker's shared-memory lane (comm/lane.py;
~40 us a round trip), and an allreduce whose workers are all on lanes is reduced without the loop
(`_reduce_on_lanes`). A rank's part is taken from whichever channel holds the awaited key, and its
sum goes back the way its partial came.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from tpi_node.comm.codec import FrameError, dtype_enum, from_pb, to_pb, wire_dtype, wire_nbytes
from tpi_node.comm.collective import AsyncCollective
from tpi_node.comm.lane import DOWN, NAP_S, UP, Lane, LaneError
from tpi_node.comm.loop import SharedLoop
from tpi_node.comm.spin import SpinBudget
from tpi_node.errors import TpiError
from tpi_node.gpu.split import half_point
from tpi_node.proto import tpi_pb2 as pb

LOOK_S = 0.0005  # while a lane is awaited, how often the sessions' sockets are read too


class PeerLost(TpiError):
    """A node of the allreduce disconnected, stopped answering, or was refused."""


class SessionEnded(PeerLost):
    """The master ended the session on purpose; `code` (a pb.ShutdownCode) says what to do next."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.code = code


class StepAborted(TpiError):
    """The master dropped the step in flight (a node was lost); the worker waits for the next."""


class HubLinks(Protocol):
    """How the hub reaches the workers (implemented by cluster/sessions.py Sessions)."""

    def missing(self) -> list[int]:
        """Worker ranks without a live session."""

    def name(self, rank: int) -> str:
        """Who `rank` is, for messages: "node w1 (rank 1)"."""

    def why_lost(self, rank: int) -> str | None:
        """Why `rank`'s session ended ("disconnected", ...), None while it is live."""

    async def send(self, rank: int, msg: pb.MasterMsg) -> None: ...

    def refuse(self, rank: int, reason: str) -> None:
        """A malformed frame came from `rank`: end its session with this reason."""

    def lane(self, rank: int) -> Lane | None:
        """`rank`'s shared-memory lane (a worker on this machine, comm/lane.py), None else."""

    def poll(self, has_frame: Callable[[int], bool]) -> None:
        """Deliver what sessions on this machine (Unix sockets) sent, waiting a little, without
        the event loop, until `has_frame(rank)` for each of them; a session found lost shows in
        `missing()`."""


@dataclass
class _Begun:
    """One allreduce begun on the master: its key, the fp32 sum so far, and how to return it."""

    key: tuple[int, int]
    acc: torch.Tensor | None  # [T, H] fp32 on the host
    device: torch.device
    dtype: torch.dtype
    out: torch.Tensor | None = None  # the sum, once reduced


class StarHub(AsyncCollective):
    """The master's side: sum(own partial, every worker's partial) in fp32, the sum sent back."""

    rank = 0

    def __init__(
        self,
        shared: SharedLoop,
        world_size: int,
        links: HubLinks,
        wire: str | torch.dtype = "fp32",
        timeout_s: float = 5.0,
        split_threshold: int = 0,
    ) -> None:
        super().__init__()
        self.shared, self.world_size, self.links, self.timeout_s = shared, world_size, links, timeout_s
        self.split_threshold = split_threshold  # steps of at least this many tokens split (0: never)
        self._begun: collections.deque[_Begun] = collections.deque()  # started, not yet reduced
        self.wire = wire_dtype(wire)
        self._wire_enum = dtype_enum(self.wire)
        self._inbox: dict[int, collections.deque] = {r: collections.deque() for r in range(1, world_size)}
        self.step_id, self.stage = 0, 0
        self._waiter: asyncio.Future | None = None
        self._want: tuple[int, int] = (0, 0)  # the key `_wait_all` awaits
        self._spin = SpinBudget()  # how long an allreduce on lanes spins before the loop's way

    # ---- called on the loop by the session layer ------------------------------------------------
    def deliver(self, rank: int, partial: pb.Partial) -> None:
        self._inbox[rank].append(partial)
        if self._waiter is not None and self._all_in():
            self._wake(None)

    def link_opened(self, rank: int) -> None:
        """A (new) session for `rank`: whatever the old one left is void."""
        self._inbox[rank].clear()

    def link_lost(self, rank: int, reason: str) -> None:
        self._wake(PeerLost(reason))

    def _wake(self, error: BaseException | None) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_exception(error) if error else w.set_result(None)

    # ---- the collective --------------------------------------------------------------------------
    def begin_step(self, step_id: int) -> None:
        self.step_id, self.stage = step_id, 0
        self._begun.clear()  # what an aborted step left in flight
        for box in self._inbox.values():  # leftovers of an aborted step
            while box and box[0].step_id < step_id:
                box.popleft()

    def split_at(self, n_tokens: int) -> int:
        return half_point(n_tokens, self.split_threshold) if self.world_size > 1 else 0

    def allreduce_start(self, t: torch.Tensor) -> _Begun:
        """Keep this node's partial as the sum's start; the workers' come on their streams."""
        key = (self.step_id, self.stage)
        self.stage += 1
        # [T, H] fp32 accumulator on the host, where the wire is (a GPU node's partial comes over)
        b = _Begun(key, t.detach().to("cpu", torch.float32, copy=True), t.device, t.dtype)
        if self.world_size == 1:
            b.out = b.acc.to(t.device, t.dtype)
        else:
            self._begun.append(b)
        return b

    def allreduce_wait(self, b: _Begun) -> torch.Tensor:
        if b.out is None and self._begun[0] is b and all(self._fits_lanes(b.acc)):
            self._reduce_on_lanes(b)
        if b.out is None:
            self.shared.run(self._reduce_through(b))
        return b.out

    async def _reduce_through(self, b: _Begun) -> None:
        while b.out is None:  # the earlier ones first: every worker sends in start order
            await self._reduce(self._begun[0])

    def _lane(self, r: int) -> Lane | None:
        """Rank r's lane, where its fp32 partials may come (a --wire other than fp32 is what the
        user chose to see on every hop: frames only)."""
        return self.links.lane(r) if self.wire == torch.float32 else None

    def _on_lane(self, r: int, key: tuple[int, int]) -> Lane | None:
        """Rank r's lane when its next entry is `key`'s (or an earlier one, which `take` refuses),
        else None: the part comes in a frame."""
        lane = self._lane(r)
        head = lane.peek(UP, key[0]) if lane is not None else None
        return lane if head is not None and head <= key else None

    def _fits_lanes(self, acc: torch.Tensor) -> Iterator[bool]:
        """Per worker, lazily (all() and any() stop at the first answer that decides them): may it
        send a partial this size on its lane?"""
        return ((lane := self._lane(r)) is not None and lane.fits(acc) for r in range(1, self.world_size))

    def _reduce_on_lanes(self, b: _Begun) -> None:
        """Every worker's partial of `b` may come on its lane: spin for them without the event loop
        (its run costs more than the lane's round trip), reading the Unix sockets every LOOK_S for
        a worker that left or reported an error, for up to the spin budget. Not longer: the loop
        also serves this master's gRPC (a worker fetching a shard again mid-step), so a longer
        wait, or a part that came in a frame, goes the loop's way (`_nap_until_all_in`)."""
        self._want = b.key
        spin_until = look = time.perf_counter()
        spin_until += self._spin.s
        while not self._all_in():
            now = time.perf_counter()
            if now >= spin_until:
                self._spin.spent(False)
                return
            if now >= look:
                self.links.poll(lambda r: True)  # each socket read once, no spin
                self._check_links()
                look = now + LOOK_S
            os.sched_yield()
        self._spin.spent(True)
        on_lanes = ((lane := self._lane(r)) is not None and lane.peek(UP, b.key[0]) == b.key for r in self._inbox)
        if all(on_lanes):
            self._sum(b)  # else a frame came, or a wrong key: the loop's way reduces it or refuses it

    async def _reduce(self, b: _Begun) -> None:
        await self._wait_all(b.key, any(self._fits_lanes(b.acc)))
        if self._sum(b):
            await asyncio.sleep(0)  # every write is handed to gRPC before the loop stops

    def _sum(self, b: _Begun) -> bool:
        """Reduce `b`, every part being here, and send the sum back: in place on the lanes, in
        frames to the others (handed to the loop) -> whether frames went."""
        key, acc = b.key, b.acc
        self._begun.popleft()
        shape = tuple(acc.shape)
        lanes = {r: self._on_lane(r, key) for r in range(1, self.world_size)}  # the way each partial came
        for r, lane in lanes.items():
            if lane is None:
                acc += self._take(r, key, shape, self._wire_enum, "partial")
                continue
            try:
                acc += lane.take(UP, key, shape, "partial")
            except FrameError as e:
                raise self._refuse(r, str(e)) from None
        framed = [r for r, lane in lanes.items() if lane is None]
        if framed:
            reduced = pb.MasterMsg(reduced=pb.Reduced(step_id=key[0], stage=key[1]))
            to_pb(acc, self.wire, out=reduced.reduced.tensor)
            if self.wire != torch.float32:  # every node must see the very same (rounded) sum: what it sent
                acc = from_pb(reduced.reduced.tensor, shape, copy=False, what="reduced sum").float()
        for r, lane in lanes.items():
            if lane is not None:
                try:
                    lane.put(DOWN, key, acc, self.timeout_s)
                except LaneError as e:
                    raise PeerLost(f"{self.links.name(r)}: {e}") from None
        # Not awaited: a write completes ~0.2 ms after gRPC took it (a wake-up of this loop), time
        # the master computes instead. Each peer's writes keep their order (Peer.write's lock); a
        # failed one ends that session, which the next wait reports (link_lost).
        for r in framed:
            _soon(self.links.send(r, reduced))
        # the payload each worker got back, a lane's (fp32) as a frame's
        self.stats.bytes_sent += wire_nbytes(acc.numel(), self.wire) * (self.world_size - 1)
        b.out, b.acc = acc.to(b.device, b.dtype), None
        return bool(framed)

    def _take(
        self, r: int, key: tuple[int, int], shape: tuple[int, ...], dtype: int, what: str, copy: bool = False
    ) -> torch.Tensor:
        """Rank r's next frame, which must be `key`'s, of `dtype` and `shape` (a view unless `copy`)."""
        box = self._inbox[r]
        msg = box.popleft()
        while msg.step_id < key[0] and box:  # left over from an aborted step
            msg = box.popleft()
        if (msg.step_id, msg.stage) != key:
            raise self._refuse(
                r,
                f"sent a {what} for step {msg.step_id} stage {msg.stage} "
                f"while step {key[0]} stage {key[1]} was being reduced",
            )
        if msg.tensor.dtype != dtype:
            raise self._refuse(r, f"sent a {what} of dtype code {msg.tensor.dtype}, expected {dtype}")
        try:
            return from_pb(msg.tensor, shape, copy=copy, what=what)
        except FrameError as e:
            raise self._refuse(r, str(e)) from None

    def gather(self, t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Every worker's frame of this stage, in fp32 whatever the wire (it is exact); nothing
        goes back. The split head's candidates (engine/vocab.py)."""
        key = (self.step_id, self.stage)
        self.stage += 1
        t0 = time.perf_counter()
        out = self.shared.run(self._gather(key, sizes)) if self.world_size > 1 else []
        self.stats.seconds += time.perf_counter() - t0
        return [t.float().cpu(), *out]

    async def _gather(self, key: tuple[int, int], sizes: list[int]) -> list[torch.Tensor]:
        while self._begun:  # the allreduces begun before it come first on every stream
            await self._reduce(self._begun[0])
        await self._wait_all(key)
        fp32 = dtype_enum(torch.float32)
        return [self._take(r, key, (sizes[r],), fp32, "head candidates", copy=True) for r in range(1, self.world_size)]

    def _has(self, r: int) -> bool:
        """Rank r's part of what `_wait_all` awaits is here: on its lane, or its next frame (which
        `_take` checks). With a lane, a frame of a later key waits for the lane's turn."""
        key, box = self._want, self._inbox[r]
        if self._lane(r) is None:
            return bool(box)
        if self._on_lane(r, key) is not None:
            return True
        return bool(box) and (box[0].step_id, box[0].stage) <= key

    def _all_in(self) -> bool:
        return all(self._has(r) for r in self._inbox)

    def _check_links(self) -> None:
        missing = self.links.missing()
        if missing:
            why = [f"{self.links.name(r)} {self.links.why_lost(r)}" for r in missing if self.links.why_lost(r)]
            raise PeerLost(f"rank(s) {missing} are not connected" + (": " + "; ".join(why) if why else ""))

    async def _wait_all(self, key: tuple[int, int], lanes: bool = False) -> None:
        """Until every worker's part of `key` (an allreduce's or a gather's) is here; `lanes`:
        some may come on a lane, which wakes nobody (else a frame's delivery wakes this wait)."""
        self._want = key
        self._check_links()
        if self._all_in():
            return
        self.links.poll(self._has)  # local workers' frames and lanes, without the loop's wake-ups
        self._check_links()
        if self._all_in():
            return
        if lanes:
            await self._nap_until_all_in(key)
            return
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        timer = loop.call_later(self.timeout_s, self._on_timeout, fut, key)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    async def _nap_until_all_in(self, key: tuple[int, int]) -> None:
        """A lane wakes nobody: look again after each short nap, the loop running in between. A
        frame that completes the set (a gRPC worker's, typically the last) wakes it at once, as
        does a session that ends (`deliver`, `link_lost`)."""
        deadline = time.monotonic() + self.timeout_s
        self._waiter = fut = asyncio.get_running_loop().create_future()
        try:
            while not fut.done() and not self._all_in():
                self._check_links()
                if time.monotonic() > deadline:
                    raise self._too_slow(key)
                await asyncio.wait((fut,), timeout=NAP_S)
            if fut.done():
                fut.result()  # PeerLost from link_lost
        finally:
            self._waiter = None

    def _too_slow(self, key: tuple[int, int]) -> PeerLost:
        slow = [r for r in self._inbox if not self._has(r)]
        return PeerLost(
            f"{', '.join(self.links.name(r) for r in slow)} sent no partial sum for step {key[0]} "
            f"stage {key[1]} within {self.timeout_s:g} s"
        )

    def _on_timeout(self, fut: asyncio.Future, key) -> None:
        if not fut.done():
            fut.set_exception(self._too_slow(key))

    def _refuse(self, rank: int, what: str) -> FrameError:
        """A malformed frame: the session layer tells the worker why; the step fails."""
        reason = f"malformed frame from {self.links.name(rank)}: {what}"
        self.links.refuse(rank, reason)
        return FrameError(reason)


_WRITES: set[asyncio.Task] = set()  # writes in flight, held until done (the loop keeps weak refs)


def _soon(coro: Awaitable) -> asyncio.Task:
    """Start `coro` on the running loop without waiting for it (its first step runs at the loop's
    next turn); its failure is retrieved here, and the session layer sees the broken stream."""
    task = asyncio.ensure_future(coro)
    _WRITES.add(task)
    task.add_done_callback(_written)
    return task


def _written(task: asyncio.Task) -> None:
    _WRITES.discard(task)
    if not task.cancelled():
        task.exception()


class SpokeChannel(Protocol):
    """A worker's end of its Session stream (implemented by cluster/link.py MasterLink)."""

    lane: Lane | None  # the session's shared-memory lane (a worker on the master's machine)

    def run(self, coro: Awaitable): ...

    async def send(self, msg: pb.WorkerMsg) -> None: ...

    async def recv(self, timeout: float | None) -> pb.MasterMsg | None: ...

    def poll(self) -> pb.MasterMsg | None:
        """The next frame if one is here now (a lane session only; PeerLost once it ended)."""

    def unread(self, msg: pb.MasterMsg) -> None:
        """Give a frame back: the next `recv` or `poll` returns it first."""


@dataclass
class _Sent:
    """One allreduce whose partial a worker sent: its key and the shape of the sum to expect."""

    key: tuple[int, int]
    shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    lane: Lane | None = None  # the sum comes on this lane (else in a frame)
    out: torch.Tensor | None = None  # the sum, once received


class StarSpoke(AsyncCollective):
    """A worker's side: send the partial, wait for the sum (validated and tagged)."""

    def __init__(
        self, link: SpokeChannel, rank: int, world_size: int, wire: str | torch.dtype = "fp32", timeout_s: float = 60.0
    ) -> None:
        super().__init__()
        self.link, self.rank, self.world_size, self.timeout_s = link, rank, world_size, timeout_s
        self.wire = wire_dtype(wire)
        self._wire_enum = dtype_enum(self.wire)
        self.step_id, self.stage = 0, 0
        self._sent: collections.deque[_Sent] = collections.deque()  # sent, sum not yet received
        self._spin = SpinBudget()  # how long a wait for a sum on the lane spins before it naps
        self._writing: asyncio.Task | None = None  # the last partial's write

    def begin_step(self, step_id: int) -> None:
        self.step_id, self.stage = step_id, 0
        self._sent.clear()

    def _partial(self, t: torch.Tensor) -> tuple[pb.WorkerMsg, _Sent]:
        key = (self.step_id, self.stage)
        self.stage += 1
        # A fresh message every time: protobuf (upb) keeps every value ever assigned to a field of
        # a reused message in that message's arena, so a reused frame grew by its payload per call.
        msg = pb.WorkerMsg(partial=pb.Partial(step_id=key[0], stage=key[1]))
        to_pb(t, self.wire, out=msg.partial.tensor)
        self.stats.bytes_sent += wire_nbytes(t.numel(), self.wire)
        s = _Sent(key, tuple(t.shape), t.device, t.dtype)
        self._sent.append(s)
        return msg, s

    def gather(self, t: torch.Tensor, sizes: list[int]) -> None:
        """Send this node's part of the gather (fp32, exact); the master answers nothing."""
        msg = pb.WorkerMsg(partial=pb.Partial(step_id=self.step_id, stage=self.stage))
        self.stage += 1
        to_pb(t.float().cpu(), torch.float32, out=msg.partial.tensor)
        self.stats.bytes_sent += t.numel() * 4
        self.link.run(self._submit(msg))
        return None

    def _on_lane(self, t: torch.Tensor) -> _Sent | None:
        """Publish the partial on the session's lane where it fits (comm/lane.py), else None."""
        lane = self.link.lane if self.wire == torch.float32 else None  # as the hub's `_lane`
        if lane is None or not lane.fits(t):
            return None
        key = (self.step_id, self.stage)
        self.stage += 1
        s = _Sent(key, tuple(t.shape), t.device, t.dtype, lane)
        try:
            lane.put(UP, key, t, self.timeout_s)
        except LaneError as e:
            raise PeerLost(f"the master stopped reading: {e}") from None
        self._sent.append(s)
        return s

    def allreduce_start(self, t: torch.Tensor) -> _Sent:
        s = self._on_lane(t)
        if s is None:
            msg, s = self._partial(t)
            self.link.run(self._submit(msg))
        return s

    def allreduce_wait(self, s: _Sent) -> torch.Tensor:
        while s.out is None:  # the sums come in start order, each on its own channel
            head = self._sent[0]
            if head.lane is not None:
                self._lane_receive(head)
            else:
                self.link.run(self._receive_through(head))
        return s.out

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """One turn of the loop for the whole round trip (decode's many small allreduces); none
        on a lane."""
        if self.wire == torch.float32 and self.link.lane is not None and self.link.lane.fits(t):
            return self.allreduce_wait(self.allreduce_start(t))
        msg, s = self._partial(t)
        self.link.run(self._submit_and_receive(msg, s))
        return s.out

    def _lane_receive(self, s: _Sent) -> None:
        """Wait for the sum of `s` (the oldest in flight) on its lane: spin, then nap, looking at
        the session's frames in between for an abort, a shutdown or the end of the stream. Other
        frames (the next step's) are given back to the link for later."""
        deadline = time.monotonic() + self.timeout_s
        spin_until = look = time.perf_counter()
        spin_until += self._spin.s
        held: list[pb.MasterMsg] = []
        try:
            while s.lane.peek(DOWN, s.key[0]) is None:
                now = time.perf_counter()
                if now >= look:  # the socket, every LOOK_S: a read costs more than a look at the lane
                    look = now + LOOK_S
                    while (msg := self.link.poll()) is not None:
                        self._control(msg)
                        if msg.WhichOneof("kind") != "heartbeat":
                            held.append(msg)
                    if time.monotonic() > deadline:
                        step, stage = s.key
                        within = f"within {self.timeout_s:g} s"
                        raise PeerLost(f"the master sent no sum for step {step} stage {stage} {within}")
                if now < spin_until:
                    os.sched_yield()
                else:
                    time.sleep(NAP_S)
        finally:
            for msg in reversed(held):
                self.link.unread(msg)
        self._spin.spent(time.perf_counter() < spin_until)
        total = s.lane.take(DOWN, s.key, s.shape, "reduced sum")
        s.out = total.to(s.device, s.dtype)
        self._sent.popleft()

    @staticmethod
    def _control(msg: pb.MasterMsg) -> None:
        """Raise for a frame that ends the step or the session."""
        kind = msg.WhichOneof("kind")
        if kind == "abort":
            raise StepAborted(msg.abort.reason)
        if kind == "shutdown":
            raise SessionEnded(f"the master ended the session: {msg.shutdown.reason}", msg.shutdown.code)

    async def _submit_and_receive(self, msg: pb.WorkerMsg, s: _Sent) -> None:
        await self._submit(msg)
        await self._receive_through(s)

    async def _submit(self, msg: pb.WorkerMsg) -> None:
        """Hand the frame to gRPC, not waiting for the write to complete (a wake-up ~0.2 ms later,
        which the wait for the sum absorbs); writes stay in order, each after the one before."""
        before = self._writing
        self._writing = _soon(self._write_after(before, msg))
        await asyncio.sleep(0)  # its first step runs now: gRPC has the frame

    async def _write_after(self, before: asyncio.Task | None, msg: pb.WorkerMsg) -> None:
        if before is not None:
            await before
        await self.link.send(msg)

    async def _receive_through(self, s: _Sent) -> None:
        """Read frames until the sum for `s` is in; the master sends sums in start order. (A
        partial that could not be sent broke the stream: the read says PeerLost.)"""
        deadline = time.monotonic() + self.timeout_s
        while s.out is None:
            key = self._sent[0].key
            reply = await self.link.recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise PeerLost(f"the master sent no sum for step {key[0]} stage {key[1]} within {self.timeout_s:g} s")
            kind = reply.WhichOneof("kind")
            if kind == "reduced":
                r, head = reply.reduced, self._sent[0]
                if (r.step_id, r.stage) != key or r.tensor.dtype != self._wire_enum:
                    raise FrameError(
                        f"the master sent a sum for step {r.step_id} stage {r.stage} "
                        f"(dtype code {r.tensor.dtype}) while step {key[0]} stage "
                        f"{key[1]} (dtype code {self._wire_enum}) was expected"
                    )
                total = from_pb(r.tensor, head.shape, copy=True, what="reduced sum")
                head.out = total.to(head.device, head.dtype)
                self._sent.popleft()
            else:
                self._control(reply)
            # heartbeats (and anything else that is not for this allreduce) are skipped
