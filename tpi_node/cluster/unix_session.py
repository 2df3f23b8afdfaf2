"""A worker's Session stream over a Unix socket, for workers on the master's own machine.

On loopback a gRPC hop costs ~0.25 ms (its core and poller threads wake before the event loop
does), and decode pays two hops per allreduce, 60 allreduces a token on SmolLM2: most of a local
2-node token. A worker that dialled its master over loopback (the workers of `run`) opens its
session on the master's Unix socket instead: the same frames (one pb.WorkerMsg / pb.MasterMsg
each, after a 4-byte little-endian length), the same Hello with its join's ticket, the same
Sessions and StarHub behind it. Join, FetchShard and Status stay on gRPC. The worker's small
partial sums and their sums skip even this socket: they ride on the shared-memory lane its Hello
names (comm/lane.py; MasterLink.open_session makes it).

Waiting. The side that waits for a frame first spins on non-blocking reads for up to SPIN_S,
yielding its core each turn (`spin`), and only then sleeps on the event loop (`read`). Waking a
sleeping process on another core costs ~30 us each way on a VM; a spinning reader has the frame
within a few us (scripts/bench_allreduce.py --session).

The socket lives in a directory only the master's user may enter (mkdtemp: 0700); the ticket of
the Hello proves the worker joined. Nothing on it is trusted more than a gRPC frame: a length over
MAX_FRAME or bytes that do not parse end the stream as malformed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message

from tpi_node.comm.spin import SPIN_S, SpinBudget
from tpi_node.proto import tpi_pb2 as pb

MAX_FRAME = 1 << 30  # as the gRPC channels' message limit (cluster/channels.py)
_LEN = struct.Struct("<I")
_CHUNK = 1 << 20
_SNDBUF = 4 << 20
END = grpc.aio.EOF  # what `read` gives at the end of the stream, as a gRPC call's read does


class FrameSocket:
    """Frames on a connected Unix socket, parsed into `kind` (pb.WorkerMsg on the master's end,
    pb.MasterMsg on a worker's). Reads and writes come from the thread that runs the event loop
    of this end; `read`/`write`/`cancel` are those of a gRPC stream, so Sessions and MasterLink
    take either."""

    def __init__(self, sock: socket.socket, kind: type[Message]) -> None:
        sock.setblocking(False)
        # a long step's frame leaves in one send where the kernel allows (net.core.wmem_max)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        self.sock, self.kind = sock, kind
        self.ended: str | None = None  # why no more frames will come (None while open)
        self._buf = bytearray()
        self._frames: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future | None = None  # a `read` sleeping until the socket is readable
        self.spin_budget = SpinBudget()

    # ---- reading ----------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Parse what the socket holds now (never blocks)."""
        while self.ended is None:
            try:
                chunk = self.sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.ended = f"disconnected ({type(e).__name__})"
                break
            if not chunk:
                self.ended = "disconnected"
                break
            self._buf += chunk
            if len(chunk) < _CHUNK:
                break
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                self._malformed(f"a frame of {n} bytes (at most {MAX_FRAME})")
                return
            if len(self._buf) < _LEN.size + n:
                return
            msg = self.kind()
            try:
                msg.ParseFromString(bytes(memoryview(self._buf)[_LEN.size : _LEN.size + n]))
            except DecodeError:
                self._malformed(f"{n} bytes that are not a {self.kind.__name__}")
                return
            del self._buf[: _LEN.size + n]
            self._frames.append(msg)

    def _malformed(self, what: str) -> None:
        self.ended = f"sent a malformed frame: {what}"
        self._buf.clear()
        self.cancel()

    def poll(self) -> Message | None:
        """The next frame if it is here now, END once the stream ended, else None."""
        if not self._frames:
            self._fill()
        if self._frames:
            return self._frames.popleft()
        return END if self.ended is not None else None

    def spin(self, limit_s: float = SPIN_S) -> Message | None:
        """The next frame, spinning for it up to the spin budget (at most `limit_s`), yielding the
        core each turn; END once the stream ended; None if nothing came."""
        msg = self.poll()
        if msg is not None:
            return msg
        deadline = time.perf_counter() + min(limit_s, self.spin_budget.s)
        while msg is None and time.perf_counter() < deadline:
            os.sched_yield()
            msg = self.poll()
        self.spin_budget.spent(msg is not None)
        return msg

    async def read(self) -> Message:
        """The next frame, sleeping on the event loop until it comes; END once the stream ended."""
        msg = self.poll()
        while msg is None:
            await self._readable()
            msg = self.poll()
        return msg

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        loop.add_reader(self.sock.fileno(), _settle, fut)
        try:
            await fut
        finally:
            self._unwatch(loop)

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._waiter is not None:
            self._waiter = None
            if self.sock.fileno() >= 0:
                loop.remove_reader(self.sock.fileno())

    # ---- writing ----------------------------------------------------------------------------------
    async def write(self, msg: Message) -> None:
        """Send one frame: at once when the socket takes it all (a partial sum), else the rest on
        the event loop (a long prefill's hidden states). ConnectionError when the peer is gone."""
        body = msg.SerializeToString()
        data = _LEN.pack(len(body)) + body
        if self.ended is not None and self.sock.fileno() < 0:
            raise ConnectionError(f"the session socket is closed ({self.ended})")
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            raise ConnectionError(f"the session socket broke ({type(e).__name__})") from None
        if sent < len(data):
            try:
                await asyncio.get_running_loop().sock_sendall(self.sock, memoryview(data)[sent:])
            except OSError as e:
                raise ConnectionError(f"the session socket broke ({type(e).__name__})") from None

    def cancel(self) -> None:
        """Close the stream: a `read` sleeping on it gives END."""
        if self.ended is None:
            self.ended = "closed"
        w = self._waiter
        if w is not None:
            self._unwatch(w.get_loop())
            _settle(w)
        with contextlib.suppress(OSError):
            self.sock.close()


def _settle(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def connect(path: str) -> FrameSocket:
    """A worker's end of a session on the master's socket at `path` (OSError when it cannot)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return FrameSocket(sock, pb.MasterMsg)


def is_loopback(address: str) -> bool:
    """Whether dialling `address` (host:port, [v6]:port) reaches this machine: a loopback address,
    or the unspecified one (`run --host 0.0.0.0` gives its workers 0.0.0.0:PORT)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


class UnixSessionServer:
    """The master's listening Unix socket: each connection is handed to `handler(None, stream)`,
    as gRPC hands the Session RPC its (request_iterator, context)."""

    def __init__(self, handler: Callable[[None, FrameSocket], Awaitable[None]], directory: str = "") -> None:
        """`directory`: where the socket goes (the caller keeps it private; removed at close);
        default a new one only this user may enter."""
        self.handler = handler
        self.dir = directory or tempfile.mkdtemp(prefix="tpi-node-")  # 0700: the master's user only
        self.path = os.path.join(self.dir, "session.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.path)
            self.sock.listen(64)
        except OSError:
            self.close()
            raise
        self.sock.setblocking(False)
        self._accepting: asyncio.Task | None = None
        self._serving: set[asyncio.Task] = set()

    def start(self) -> None:
        """On the master's event loop: accept connections from now on."""
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = loop.create_task(self._serve(FrameSocket(conn, pb.WorkerMsg)))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, stream: FrameSocket) -> None:
        try:
            await self.handler(None, stream)
        finally:
            stream.cancel()

    async def stop(self) -> None:
        """On the loop: stop accepting and end every session (their workers see END)."""
        for task in [self._accepting, *self._serving]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._accepting, *self._serving] if t is not None], return_exceptions=True)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
