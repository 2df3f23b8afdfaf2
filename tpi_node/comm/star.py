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

Transport cost, measured on loopback (576 floats, 2 processes, 2-core VM): grpc.aio + uvloop
~170 us per allreduce; grpc.aio + asyncio ~225 us; sync grpc with queue hand-offs ~380 us;
unary Reduce calls ~370 us (scripts/bench_allreduce.py has the side-by-side table with gloo).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable
from typing import Protocol

import torch

from tpi_node.comm.codec import FrameError, dtype_enum, from_pb, to_pb, wire_dtype, wire_nbytes
from tpi_node.comm.collective import Collective
from tpi_node.comm.loop import SharedLoop
from tpi_node.errors import TpiError
from tpi_node.proto import tpi_pb2 as pb


class PeerLost(TpiError):
    """A node of the allreduce disconnected, stopped answering, or was refused."""


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


class StarHub(Collective):
    """The master's side: sum(own partial, every worker's partial) in fp32, the sum sent back."""

    rank = 0

    def __init__(
        self,
        shared: SharedLoop,
        world_size: int,
        links: HubLinks,
        wire: str | torch.dtype = "fp32",
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__()
        self.shared, self.world_size, self.links, self.timeout_s = shared, world_size, links, timeout_s
        self.wire = wire_dtype(wire)
        self._wire_enum = dtype_enum(self.wire)
        self._inbox: dict[int, collections.deque] = {r: collections.deque() for r in range(1, world_size)}
        self.step_id, self.stage = 0, 0
        self._waiter: asyncio.Future | None = None

    # ---- called on the loop by the session layer ------------------------------------------------
    def deliver(self, rank: int, partial: pb.Partial) -> None:
        self._inbox[rank].append(partial)
        if self._waiter is not None and all(self._inbox[r] for r in self._inbox):
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
        for box in self._inbox.values():  # leftovers of an aborted step
            while box and box[0].step_id < step_id:
                box.popleft()

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        key = (self.step_id, self.stage)
        self.stage += 1
        out = self.shared.run(self._reduce(t, key))
        self.stats.bytes_sent += wire_nbytes(out.numel(), self.wire) * (self.world_size - 1)
        return out

    async def _reduce(self, t: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        # [T, H] fp32 accumulator on the host, where the wire is (a GPU node's partial comes over)
        acc = t.detach().to("cpu", torch.float32, copy=True)
        if self.world_size == 1:
            return acc.to(t.device, t.dtype)
        await self._wait_all(key)
        shape = tuple(t.shape)
        for r in range(1, self.world_size):
            box = self._inbox[r]
            msg = box.popleft()
            while msg.step_id < key[0] and box:  # left over from an aborted step
                msg = box.popleft()
            if (msg.step_id, msg.stage) != key:
                raise self._refuse(
                    r,
                    f"sent a partial for step {msg.step_id} stage {msg.stage} "
                    f"while step {key[0]} stage {key[1]} was being reduced",
                )
            if msg.tensor.dtype != self._wire_enum:
                raise self._refuse(r, f"sent a partial of dtype code {msg.tensor.dtype}, expected {self._wire_enum}")
            try:
                acc += from_pb(msg.tensor, shape, copy=False, what="partial")
            except FrameError as e:
                raise self._refuse(r, str(e)) from None
        reduced = pb.MasterMsg(reduced=pb.Reduced(step_id=key[0], stage=key[1]))
        to_pb(acc, self.wire, out=reduced.reduced.tensor)
        for r in range(1, self.world_size):
            await self.links.send(r, reduced)
        if self.wire != torch.float32:  # every node must see the very same (rounded) sum: what it sent
            acc = from_pb(reduced.reduced.tensor, shape, copy=False, what="reduced sum").float()
        return acc.to(t.device, t.dtype)

    async def _wait_all(self, key: tuple[int, int]) -> None:
        missing = self.links.missing()
        if missing:
            why = [f"{self.links.name(r)} {self.links.why_lost(r)}" for r in missing if self.links.why_lost(r)]
            raise PeerLost(f"rank(s) {missing} are not connected" + (": " + "; ".join(why) if why else ""))
        if all(self._inbox[r] for r in self._inbox):
            return
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        timer = loop.call_later(self.timeout_s, self._on_timeout, fut, key)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    def _on_timeout(self, fut: asyncio.Future, key) -> None:
        slow = [r for r in self._inbox if not self._inbox[r]]
        if not fut.done():
            fut.set_exception(
                PeerLost(
                    f"{', '.join(self.links.name(r) for r in slow)} sent no partial sum for step {key[0]} "
                    f"stage {key[1]} within {self.timeout_s:g} s"
                )
            )

    def _refuse(self, rank: int, what: str) -> FrameError:
        """A malformed frame: the session layer tells the worker why; the step fails."""
        reason = f"malformed frame from {self.links.name(rank)}: {what}"
        self.links.refuse(rank, reason)
        return FrameError(reason)


class SpokeChannel(Protocol):
    """A worker's end of its Session stream (implemented by cluster/link.py MasterLink)."""

    def run(self, coro: Awaitable): ...

    async def send(self, msg: pb.WorkerMsg) -> None: ...

    async def recv(self, timeout: float | None) -> pb.MasterMsg | None: ...


class StarSpoke(Collective):
    """A worker's side: send the partial, wait for the sum (validated and tagged)."""

    def __init__(
        self, link: SpokeChannel, rank: int, world_size: int, wire: str | torch.dtype = "fp32", timeout_s: float = 60.0
    ) -> None:
        super().__init__()
        self.link, self.rank, self.world_size, self.timeout_s = link, rank, world_size, timeout_s
        self.wire = wire_dtype(wire)
        self._wire_enum = dtype_enum(self.wire)
        self.step_id, self.stage = 0, 0

    def begin_step(self, step_id: int) -> None:
        self.step_id, self.stage = step_id, 0

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        key = (self.step_id, self.stage)
        self.stage += 1
        self.stats.bytes_sent += wire_nbytes(t.numel(), self.wire)
        return self.link.run(self._exchange(t, key))

    async def _exchange(self, t: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        # A fresh message every time: protobuf (upb) keeps every value ever assigned to a field of
        # a reused message in that message's arena, so a reused frame grew by its payload per call.
        msg = pb.WorkerMsg(partial=pb.Partial(step_id=key[0], stage=key[1]))
        to_pb(t, self.wire, out=msg.partial.tensor)
        await self.link.send(msg)
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = await self.link.recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise PeerLost(f"the master sent no sum for step {key[0]} stage {key[1]} within {self.timeout_s:g} s")
            kind = reply.WhichOneof("kind")
            if kind == "reduced":
                r = reply.reduced
                if (r.step_id, r.stage) != key or r.tensor.dtype != self._wire_enum:
                    raise FrameError(
                        f"the master sent a sum for step {r.step_id} stage {r.stage} "
                        f"(dtype code {r.tensor.dtype}) while step {key[0]} stage "
                        f"{key[1]} (dtype code {self._wire_enum}) was expected"
                    )
                total = from_pb(r.tensor, tuple(t.shape), copy=True, what="reduced sum")
                return total.to(t.device, t.dtype)
            if kind == "abort":
                raise StepAborted(reply.abort.reason)
            if kind == "shutdown":
                raise PeerLost(f"the master ended the session: {reply.shutdown.reason}")
            # heartbeats (and anything else that is not for this allreduce) are skipped
