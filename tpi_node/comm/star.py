"""The star allreduce over gRPC: every worker sends its partial to the master, the master sums
them with its own (fp32) and sends the sum back. Two hops, which is what wins when link latency
dominates (TPI-LLM).

Transport. Frames ride on the one Session stream of each worker (protos/tpi.proto), using
grpc.aio on one event loop per process (uvloop when installed) and no thread hand-off on the hot
path: the thread that computes runs the loop itself (`loop.run_until_complete`) while it waits for
a sum. On the master, a background thread runs the loop while no step is in flight (Join,
FetchShard, Status, heartbeats) and the engine's step thread borrows it for a whole step
(`SharedLoop.borrow`). Measured on loopback, 576 floats, 2 processes, 2-core VM: grpc.aio + uvloop
~170 us per allreduce; grpc.aio + asyncio ~225 us; sync grpc with queue hand-offs ~380 us;
unary Reduce calls ~370 us (scripts/bench_allreduce.py has the side-by-side table with gloo).

Every allreduce is tagged (step id, stage); stage = 0, 1, 2, ... within a step, so a stale or
out-of-order frame is detected. A peer that disconnects, or sends nothing within `timeout_s`,
raises `PeerLost` on the master within that time (default 5 s).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Awaitable, Callable

import grpc
import torch

from tpi_node.comm.codec import FrameError, dtype_enum, from_proto, to_proto, wire_dtype
from tpi_node.comm.collective import Collective
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.proto import tpi_pb2_grpc as rpc

# Frames up to 1 GiB (a long prefill's hidden states); keepalive so a silent peer is noticed.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.min_time_between_pings_ms", 1000),
]
# A worker may dial before the master listens: retry fast, and never share a subchannel that is
# backing off with a later channel of the same process.
DIAL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]


class PeerLost(RuntimeError):
    """A node of the allreduce disconnected, stopped answering, or was refused."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # plain asyncio works, ~30% slower per allreduce
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SharedLoop:
    """One event loop per process, run by a background thread while idle; a compute thread
    `borrow()`s it for a whole step and then runs it itself (run_until_complete) whenever it waits
    on the network, so a frame goes from gRPC to the waiting code with no thread hand-off."""

    def __init__(self, background: bool = True) -> None:
        self.loop = new_event_loop()
        self._owner: int | None = None
        self._lock = threading.Lock()
        self._may_run = threading.Event()
        self._parked = threading.Event()
        self._closed = False
        self._thread = None
        if background:
            self._may_run.set()
            self._thread = threading.Thread(target=self._run_idle, name="tpi-grpc-loop", daemon=True)
            self._thread.start()
        else:
            self._owner = threading.get_ident()      # the creating thread always owns it

    def _run_idle(self) -> None:
        asyncio.set_event_loop(self.loop)
        while True:
            self._may_run.wait()
            if self._closed:
                return
            self.loop.run_forever()
            self._parked.set()

    @contextlib.contextmanager
    def borrow(self):
        """Park the background thread; this thread runs the loop until the block ends."""
        me = threading.get_ident()
        if self._owner == me:
            yield
            return
        with self._lock:
            self._may_run.clear()
            self._parked.clear()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._parked.wait()
            self._owner = me
            try:
                yield
            finally:
                self._owner = None
                self._may_run.set()

    def run(self, coro: Awaitable, timeout: float | None = None):
        """Run `coro` on the loop: inline when this thread owns it, else through the loop thread."""
        if self._owner == threading.get_ident():
            return self.loop.run_until_complete(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable, *args) -> None:
        """Schedule a plain callback on the loop from any thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self._closed = True
        self._may_run.set()
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


class Peer:
    """The master's end of one worker's Session stream."""

    def __init__(self, rank: int, node_id: str, context) -> None:
        self.rank, self.node_id, self.context = rank, node_id, context
        self.inbox: collections.deque = collections.deque()     # Partial frames, in arrival order
        self.lost: str | None = None
        self.last_seen = time.monotonic()
        self._wlock = asyncio.Lock()

    async def write(self, msg: pb.MasterMsg) -> None:
        async with self._wlock:
            await self.context.write(msg)

    def name(self) -> str:
        return f"node {self.node_id} (rank {self.rank})"


class StarHub(Collective):
    """The master's side: sum(own partial, every worker's partial) in fp32, the sum sent back."""

    rank = 0

    def __init__(self, shared: SharedLoop, world_size: int, wire: str | torch.dtype = "fp32",
                 timeout_s: float = 5.0) -> None:
        super().__init__()
        self.shared, self.world_size, self.timeout_s = shared, world_size, timeout_s
        self.wire = wire_dtype(wire)
        self._wire_enum = dtype_enum(self.wire)
        self.peers: dict[int, Peer] = {}
        self.step_id, self.stage = 0, 0
        self._waiter: asyncio.Future | None = None

    # ---- called on the loop by the Session handlers ------------------------------------------
    def attach(self, peer: Peer) -> None:
        old = self.peers.get(peer.rank)
        if old is not None and old is not peer:
            self.detach(old, "replaced by a new session")
        self.peers[peer.rank] = peer

    def detach(self, peer: Peer, reason: str) -> None:
        if peer.lost is None:
            peer.lost = reason
        if self.peers.get(peer.rank) is peer:
            self._wake(PeerLost(f"{peer.name()} {reason}"))

    def deliver(self, peer: Peer, partial: pb.Partial) -> None:
        peer.last_seen = time.monotonic()
        peer.inbox.append(partial)
        if self._waiter is not None and all(self._has(r) for r in range(1, self.world_size)):
            self._wake(None)

    def _has(self, rank: int) -> bool:
        p = self.peers.get(rank)
        return p is not None and bool(p.inbox)

    def _wake(self, error: BaseException | None) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_exception(error) if error else w.set_result(None)

    def missing(self) -> list[int]:
        """Ranks without a live session."""
        return [r for r in range(1, self.world_size) if r not in self.peers or self.peers[r].lost]

    # ---- the collective ------------------------------------------------------------------------
    def begin_step(self, step_id: int) -> None:
        self.step_id, self.stage = step_id, 0
        for p in self.peers.values():               # leftovers of an aborted step
            while p.inbox and p.inbox[0].step_id < step_id:
                p.inbox.popleft()

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        key = (self.step_id, self.stage)
        self.stage += 1
        out = self.shared.run(self._reduce(t, key))
        self.stats.bytes_sent += out.numel() * out.element_size() * (self.world_size - 1)
        return out

    async def _reduce(self, t: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        # [T, H] fp32 accumulator on the host, where the wire is (a GPU node's partial comes over)
        acc = t.detach().to("cpu", torch.float32, copy=True)
        if self.world_size == 1:
            return acc.to(t.device, t.dtype)
        await self._wait_all(key)
        shape = tuple(t.shape)
        for r in range(1, self.world_size):
            peer = self.peers[r]
            msg = peer.inbox.popleft()
            while msg.step_id < key[0] and peer.inbox:          # left over from an aborted step
                msg = peer.inbox.popleft()
            if (msg.step_id, msg.stage) != key:
                raise self._refuse(peer, f"sent a partial for step {msg.step_id} stage {msg.stage} "
                                         f"while step {key[0]} stage {key[1]} was being reduced")
            if msg.tensor.dtype != self._wire_enum:
                raise self._refuse(peer, f"sent a partial of dtype code {msg.tensor.dtype}, "
                                         f"expected {self._wire_enum}")
            try:
                acc += from_proto(msg.tensor, shape, copy=False, what="partial")
            except FrameError as e:
                raise self._refuse(peer, str(e)) from None
        reduced = pb.MasterMsg(reduced=pb.Reduced(step_id=key[0], stage=key[1]))
        to_proto(acc, self.wire, out=reduced.reduced.tensor)
        for r in range(1, self.world_size):
            await self.peers[r].write(reduced)
        if self.wire != torch.float32:       # every node must see the very same (rounded) sum
            acc = acc.to(self.wire).float()
        return acc.to(t.device, t.dtype)

    async def _wait_all(self, key: tuple[int, int]) -> None:
        missing = self.missing()
        if missing:
            raise PeerLost(f"rank(s) {missing} are not connected" + self._reasons(missing))
        if all(self._has(r) for r in range(1, self.world_size)):
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
        slow = [r for r in range(1, self.world_size) if not self._has(r)]
        names = ", ".join(self.peers[r].name() if r in self.peers else f"rank {r}" for r in slow)
        if not fut.done():
            fut.set_exception(PeerLost(f"{names} sent no partial sum for step {key[0]} stage {key[1]} "
                                       f"within {self.timeout_s:g} s"))

    def _reasons(self, ranks: list[int]) -> str:
        why = [f"{self.peers[r].name()} {self.peers[r].lost}" for r in ranks if r in self.peers]
        return (": " + "; ".join(why)) if why else ""

    def _refuse(self, peer: Peer, what: str) -> FrameError:
        """A malformed frame: tell the worker why (it shuts its session) and fail the step."""
        msg = f"malformed frame from {peer.name()}: {what}"
        peer.lost = msg
        asyncio.get_running_loop().create_task(
            self._send_quietly(peer, pb.MasterMsg(shutdown=pb.Shutdown(reason=msg))))
        return FrameError(msg)

    async def _send_quietly(self, peer: Peer, msg: pb.MasterMsg) -> None:
        with contextlib.suppress(Exception):
            await peer.write(msg)

    async def broadcast(self, msg: pb.MasterMsg) -> None:
        """Send one frame to every connected worker (Step, Free, Abort)."""
        for r in range(1, self.world_size):
            p = self.peers.get(r)
            if p is None or p.lost:
                raise PeerLost(f"rank {r} is not connected" + self._reasons([r]))
            await p.write(msg)

    async def serve_peer(self, peer: Peer) -> None:
        """Read a worker's frames until its stream ends: partials to the hub, the rest noted."""
        self.attach(peer)
        reason = "disconnected"
        try:
            while peer.lost is None:
                msg = await peer.context.read()
                if msg is grpc.aio.EOF:
                    break
                kind = msg.WhichOneof("kind")
                if kind == "partial":
                    self.deliver(peer, msg.partial)
                elif kind == "heartbeat":
                    peer.last_seen = time.monotonic()
                elif kind == "error":
                    reason = f"reported an error: {msg.error.message}"
                    break
        except (grpc.RpcError, asyncio.CancelledError, ConnectionError) as e:
            reason = f"disconnected ({type(e).__name__})"
        finally:
            self.detach(peer, peer.lost or reason)


class SpokeLink:
    """A worker's end of its Session stream, on a loop that the worker's one thread runs itself."""

    def __init__(self, address: str, timeout_s: float = 10.0, tls=None) -> None:
        self.address, self.tls = address, tls          # tls: cluster.tls.TlsFiles for mutual TLS
        self.loop = new_event_loop()
        self.channel = self.call = None
        self._read: asyncio.Future | None = None
        self.run(self._open(timeout_s))

    def run(self, coro: Awaitable):
        return self.loop.run_until_complete(coro)

    async def _open(self, timeout_s: float) -> None:
        if self.tls is not None:
            from tpi_node.cluster.tls import CHANNEL_OPTIONS as TLS_OPTIONS, channel_credentials
            self.channel = grpc.aio.secure_channel(self.address, channel_credentials(self.tls),
                                                   options=list(DIAL_OPTIONS) + list(TLS_OPTIONS))
        else:
            self.channel = grpc.aio.insecure_channel(self.address, options=DIAL_OPTIONS)
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
        except asyncio.TimeoutError:
            hint = ("; does the master use TLS with this cluster's CA?" if self.tls is not None
                    else "; if the master uses TLS, give --certs DIR")
            raise PeerLost(f"cannot reach the master at {self.address} within {timeout_s:g} s{hint}") from None
        self.stub = rpc.MasterStub(self.channel)

    def open_session(self) -> None:
        self.call = self.stub.Session()

    def close_session(self) -> None:
        """End the current Session stream (the channel stays open for a new Join)."""
        if self._read is not None:
            self._read.cancel()
            self._read = None
        if self.call is not None:
            self.call.cancel()
            self.call = None

    async def send(self, msg: pb.WorkerMsg) -> None:
        try:
            await self.call.write(msg)
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            raise PeerLost(f"lost the master at {self.address}: {_rpc_reason(e)}") from None

    async def recv(self, timeout: float | None) -> pb.MasterMsg | None:
        """The next frame from the master, or None after `timeout` seconds (the read stays pending)."""
        if self._read is None:
            self._read = asyncio.ensure_future(self.call.read())
        if not self._read.done():
            done, _ = await asyncio.wait((self._read,), timeout=timeout)
            if not done:
                return None
        fut, self._read = self._read, None
        try:
            msg = fut.result()
        except (grpc.RpcError, asyncio.CancelledError) as e:
            raise PeerLost(f"lost the master at {self.address}: {_rpc_reason(e)}") from None
        if msg is grpc.aio.EOF:
            raise PeerLost(f"the master at {self.address} closed the session")
        return msg

    def close(self) -> None:
        async def _close():
            if self._read is not None:
                self._read.cancel()
            if self.call is not None:
                self.call.cancel()
            if self.channel is not None:
                await self.channel.close()
        with contextlib.suppress(Exception):
            self.run(_close())
        self.loop.close()


def _rpc_reason(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__


class StepAborted(RuntimeError):
    """The master dropped the step in flight (a node was lost); the worker waits for the next."""


class StarSpoke(Collective):
    """A worker's side: send the partial, wait for the sum (validated and tagged)."""

    def __init__(self, link: SpokeLink, rank: int, world_size: int, wire: str | torch.dtype = "fp32",
                 timeout_s: float = 60.0) -> None:
        super().__init__()
        self.link, self.rank, self.world_size, self.timeout_s = link, rank, world_size, timeout_s
        self.wire = wire_dtype(wire)
        self._wire_enum = dtype_enum(self.wire)
        self.step_id, self.stage = 0, 0
        self._msg = pb.WorkerMsg()

    def begin_step(self, step_id: int) -> None:
        self.step_id, self.stage = step_id, 0

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        key = (self.step_id, self.stage)
        self.stage += 1
        self.stats.bytes_sent += t.numel() * self.wire.itemsize
        return self.link.run(self._exchange(t, key))

    async def _exchange(self, t: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        msg = self._msg
        msg.partial.step_id, msg.partial.stage = key
        to_proto(t, self.wire, out=msg.partial.tensor)
        await self.link.send(msg)
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = await self.link.recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise PeerLost(f"the master sent no sum for step {key[0]} stage {key[1]} "
                               f"within {self.timeout_s:g} s")
            kind = reply.WhichOneof("kind")
            if kind == "reduced":
                r = reply.reduced
                if (r.step_id, r.stage) != key or r.tensor.dtype != self._wire_enum:
                    raise FrameError(f"the master sent a sum for step {r.step_id} stage {r.stage} "
                                     f"(dtype code {r.tensor.dtype}) while step {key[0]} stage "
                                     f"{key[1]} (dtype code {self._wire_enum}) was expected")
                total = from_proto(r.tensor, tuple(t.shape), copy=True, what="reduced sum")
                return total.to(t.device, t.dtype)
            if kind == "abort":
                raise StepAborted(reply.abort.reason)
            if kind == "shutdown":
                raise PeerLost(f"the master ended the session: {reply.shutdown.reason}")
            # heartbeats (and anything else that is not for this allreduce) are skipped


class _HubOnlyService(rpc.MasterServicer):
    """A Master that only runs Sessions for a StarHub (benchmarks and the collective's tests;
    the cluster's master servicer adds Join, FetchShard and Status)."""

    def __init__(self, hub: StarHub) -> None:
        self.hub = hub

    async def Session(self, request_iterator, context):
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            return
        rank = first.hello.rank
        if not 1 <= rank < self.hub.world_size:
            await context.write(pb.MasterMsg(shutdown=pb.Shutdown(reason=f"rank {rank} is not in this plan")))
            return
        await self.hub.serve_peer(Peer(rank, first.hello.node_id, context))


def serve_hub(hub: StarHub, address: str) -> tuple[grpc.aio.Server, int]:
    """Start a Session-only gRPC server for `hub` on its loop; returns (server, bound port)."""
    async def _start():
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        rpc.add_MasterServicer_to_server(_HubOnlyService(hub), server)
        port = server.add_insecure_port(address)
        await server.start()
        hub.server = server            # a grpc.aio.Server that is garbage-collected shuts down
        return server, port
    return hub.shared.run(_start())


def join_hub(address: str, rank: int, world_size: int, wire: str = "fp32", node_id: str = "",
             timeout_s: float = 60.0) -> StarSpoke:
    """Dial a hub and say hello: the worker end used by benchmarks and the collective's tests."""
    link = SpokeLink(address)
    link.open_session()
    link.run(link.send(pb.WorkerMsg(hello=pb.Hello(node_id=node_id or f"rank-{rank}", rank=rank))))
    return StarSpoke(link, rank, world_size, wire, timeout_s)


def wait_for_peers(hub: StarHub, timeout_s: float = 30.0) -> None:
    """Block until every worker rank has a live session (or raise PeerLost)."""
    deadline = time.monotonic() + timeout_s
    while hub.missing():
        if time.monotonic() > deadline:
            raise PeerLost(f"rank(s) {hub.missing()} did not connect within {timeout_s:g} s")
        hub.shared.run(asyncio.sleep(0.01))
