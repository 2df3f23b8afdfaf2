"""A worker's link to the master: one gRPC channel (Challenge, Join, FetchShard) and the current
Session stream, on an event loop this worker's one thread runs itself (no thread hand-off: the
thread that computes runs the loop whenever it waits for a frame).

The Session stream is a gRPC call, or, for a worker on the master's machine, a Unix socket
(cluster/unix_session.py) on which `recv` first spins for the frame before it sleeps."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable

import grpc

from tpi_node.cluster.channels import dial
from tpi_node.cluster.tls import TlsFiles
from tpi_node.cluster.unix_session import FrameSocket, connect
from tpi_node.comm.lane import Lane
from tpi_node.comm.lane import supported as lane_supported
from tpi_node.comm.loop import new_event_loop
from tpi_node.comm.star import PeerLost, StarSpoke
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.proto import tpi_pb2_grpc as rpc


class MasterLink:
    def __init__(self, address: str, timeout_s: float = 10.0, tls: TlsFiles | None = None) -> None:
        self.address, self.tls = address, tls
        self.loop = new_event_loop()
        self.channel = self.call = None
        self.lane: Lane | None = None  # the session's shared-memory lane (comm/lane.py), on a Unix socket
        self._read: asyncio.Future | None = None
        self._unread: collections.deque[pb.MasterMsg] = collections.deque()  # frames given back (`unread`)
        try:
            self.run(self._open(timeout_s))
        except BaseException:  # a worker dials again and again while its master is away: leak nothing
            self.close()
            raise

    def run(self, coro: Awaitable):
        return self.loop.run_until_complete(coro)

    async def _open(self, timeout_s: float) -> None:
        self.channel = dial(self.address, self.tls)
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
        except asyncio.TimeoutError:
            hint = (
                "; does the master use TLS with this cluster's CA?"
                if self.tls is not None
                else "; if the master uses TLS, give --certs DIR"
            )
            raise PeerLost(f"cannot reach the master at {self.address} within {timeout_s:g} s{hint}") from None
        self.stub = rpc.MasterStub(self.channel)

    def open_session(self, hello: pb.Hello, unix_path: str = "", wire: str = "fp32") -> str:
        """Open the Session stream and say hello: on the master's Unix socket `unix_path` when
        given and it connects, else on gRPC; with a shared-memory lane on the socket where the
        `wire` is fp32 (another is what the user chose to see on every hop: comm/star.py).
        -> what it runs on, for the log."""
        self.close_session()  # what an earlier session left
        why = ""
        self._unread.clear()
        if unix_path:
            try:
                self.call = connect(unix_path)
            except OSError as e:
                why = f" (the master's Unix socket: {e.strerror or e})"
        if self.local and wire == "fp32" and lane_supported():
            try:
                self.lane = Lane.create()
                hello.lane = self.lane.path
            except OSError as e:  # /dev/shm full or read-only: the sums ride on the socket
                why = f" (no shared-memory lane: {e.strerror or e})"

        async def _open():  # the call is made on this link's loop (any thread may own the link)
            if not self.local:
                self.call = self.stub.Session()
            await self.send(pb.WorkerMsg(hello=hello))

        self.run(_open())
        if self.lane is not None:
            return "a Unix socket (same machine), small partial sums on a shared-memory lane"
        return ("a Unix socket (same machine)" if self.local else "gRPC") + why

    @property
    def local(self) -> bool:
        """The session runs on the master's Unix socket."""
        return isinstance(self.call, FrameSocket)

    def close_session(self) -> None:
        """End the current Session stream (the channel stays open for a new Join)."""
        if self._read is not None:
            self._read.cancel()
            self._read = None
        if self.call is not None:
            self.call.cancel()
            self.call = None
        if self.lane is not None:
            self.lane.close()
            self.lane = None

    async def send(self, msg: pb.WorkerMsg) -> None:
        try:
            await self.call.write(msg)
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError, ConnectionError) as e:
            raise PeerLost(f"lost the master at {self.address}: {rpc_reason(e)}") from None

    async def recv(self, timeout: float | None) -> pb.MasterMsg | None:
        """The next frame from the master, or None after `timeout` seconds (the read stays pending)."""
        if self._unread:
            return self._unread.popleft()
        if self._read is None and self.local:  # spin for it first (a sum due within a layer's time)
            msg = self.call.spin() if timeout is None else self.call.spin(timeout)
            if msg is not None:
                return self._checked(msg)
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
            raise PeerLost(f"lost the master at {self.address}: {rpc_reason(e)}") from None
        return self._checked(msg)

    def poll(self) -> pb.MasterMsg | None:
        """The next frame if it is here now, else None (a Unix-socket session: a lane's wait)."""
        if self._unread:
            return self._unread.popleft()
        msg = self.call.poll()
        return None if msg is None else self._checked(msg)

    def unread(self, msg: pb.MasterMsg) -> None:
        self._unread.appendleft(msg)

    def _checked(self, msg: pb.MasterMsg) -> pb.MasterMsg:
        if msg is grpc.aio.EOF:
            ended = f" ({self.call.ended})" if self.local and self.call.ended != "disconnected" else ""
            raise PeerLost(f"the master at {self.address} closed the session{ended}")
        return msg

    def close(self) -> None:
        async def _close():
            if self.call is not None:
                self.call.cancel()
            # what an interrupted run() left (a pending read, a recv waiting on it) ends here,
            # not as "Task was destroyed but it is pending" when the loop closes
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            self._read = None
            if self.channel is not None:
                await self.channel.close()

        with contextlib.suppress(Exception):
            self.run(_close())
        self.loop.close()
        if self.lane is not None:
            self.lane.close()
            self.lane = None


def rpc_reason(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__


def join_star(
    address: str,
    rank: int,
    world_size: int,
    wire: str = "fp32",
    node_id: str = "",
    timeout_s: float = 60.0,
    unix_path: str = "",
) -> StarSpoke:
    """Dial a star session server (cluster/star_server.py) and say hello (on its Unix socket
    `unix_path` when given): the worker end used by benchmarks and the collective's tests."""
    link = MasterLink(address)
    link.open_session(pb.Hello(node_id=node_id or f"rank-{rank}", rank=rank), unix_path, wire)
    return StarSpoke(link, rank, world_size, wire, timeout_s)
