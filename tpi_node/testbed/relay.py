"""A transparent TCP delay relay: the link latency of the emulated testbed.

This machine's kernel has tbf (bandwidth) but no netem (delay), so latency is added in user space.
Inside a node's network namespace (or container) a netfilter rule redirects every TCP connection
that arrives on the node's link to this relay (see `nft_redirect_rules`); the relay reads the
connection's original destination (SO_ORIGINAL_DST), dials it on the node itself and forwards
both directions, each delayed by the link latency and kept in order. A connection from node A to
node B therefore sees L from A to B and L back: L is the one-way latency between two nodes, for
gRPC, HTTP and gloo alike (connections a node makes to itself are not redirected).

    python -m tpi_node.testbed.relay --port 15001 --delay-ms 1 [--control FILE]

SIGHUP re-reads the delay (milliseconds, one number) from --control, so a running testbed can
change its latency without dropping connections. Efficiency: one event loop, no thread per
connection, bytes are forwarded as they arrive (no re-framing), and one timer per direction
serves every chunk that is due (FIFO, so order is kept even when the delay changes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import logging
import os
import signal
import socket
import struct
from pathlib import Path

log = logging.getLogger("tpi_node.testbed.relay")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
QUEUE_HIGH = 8 << 20  # bytes held back per direction before the sender is paused
QUEUE_LOW = 2 << 20


def nft_redirect_rules(table: str, iface: str, relay_port: int) -> str:
    """nft script: TCP arriving on `iface` (except to the relay itself) goes to the relay."""
    return (
        f"table ip {table} {{\n"
        f"  chain prerouting {{\n"
        f"    type nat hook prerouting priority dstnat; policy accept;\n"
        f'    iifname "{iface}" tcp dport != {relay_port} redirect to :{relay_port}\n'
        f"  }}\n"
        f"}}\n"
    )


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """(ip, port) the client dialed before the redirect (struct sockaddr_in: family, port, addr)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


class Relay:
    """Holds the current delay (seconds); shared by every pipe."""

    def __init__(self, delay_s: float, control: Path | None = None) -> None:
        self.delay = delay_s
        self.control = control
        self.connections = 0
        # How late the relay wakes after a timer's time (scheduling, the wake-up itself): learnt
        # as a moving average and subtracted, so the delay a byte sees is on average the delay
        # asked for, not delay + wake-up lateness.
        self.lateness = 0.0

    def learn_lateness(self, error: float) -> None:
        self.lateness = min(max(self.lateness + 0.1 * error, 0.0), 0.0005)

    def reload(self) -> None:
        if self.control is None:
            return
        try:
            self.delay = max(0.0, float(self.control.read_text().strip() or 0)) / 1000.0
            log.info("delay now %.3f ms", self.delay * 1000)
        except (OSError, ValueError) as e:
            log.error("cannot read the delay from %s: %s", self.control, e)


class _itimerspec(ctypes.Structure):
    _fields_ = [
        ("interval_s", ctypes.c_long),
        ("interval_ns", ctypes.c_long),
        ("value_s", ctypes.c_long),
        ("value_ns", ctypes.c_long),
    ]


class PreciseTimer:
    """A one-shot timer on CLOCK_MONOTONIC (the clock of loop.time()) with nanosecond resolution.

    asyncio's own timers wake through epoll, which rounds every timeout up to a whole millisecond:
    a 1 ms delay would come out as 1-2 ms. A timerfd in the loop's reader set wakes on time."""

    _libc = None

    def __init__(self, loop: asyncio.AbstractEventLoop, callback) -> None:
        if PreciseTimer._libc is None:
            PreciseTimer._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.loop, self.callback = loop, callback
        loop.add_reader(self.fd, self._fired)

    def arm_at(self, t: float) -> None:
        t = max(t, 1e-9)
        spec = _itimerspec(0, 0, int(t), int((t - int(t)) * 1e9) or 1)
        self._libc.timerfd_settime(self.fd, 1, ctypes.byref(spec), None)  # TFD_TIMER_ABSTIME

    def _fired(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return
        self.callback()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


class DelayedPipe:
    """One direction of a connection: bytes received at t are written to `dst` at t + delay."""

    def __init__(
        self, relay: Relay, loop: asyncio.AbstractEventLoop, src: asyncio.Transport, dst: asyncio.Transport, on_done
    ) -> None:
        self.relay, self.loop, self.src, self.dst = relay, loop, src, dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.armed = False
        self.timer: PreciseTimer | None = None
        self.eof = False
        self.done = False
        self.on_done = on_done
        self.src_paused_by_queue = False

    def feed(self, data: bytes) -> None:
        if self.relay.delay <= 0 and not self.queue:
            self.dst.write(data)  # no delay: straight through
            return
        self.queue.append((self.loop.time() + self.relay.delay, data))
        self.queued += len(data)
        if self.queued > QUEUE_HIGH and not self.src_paused_by_queue:
            self.src_paused_by_queue = True
            self.src.pause_reading()
        if not self.armed:
            self._arm()

    def _arm(self) -> None:
        if self.timer is None:
            self.timer = PreciseTimer(self.loop, self.flush)
        self.timer.arm_at(self.queue[0][0] - self.relay.lateness)
        self.armed = True

    def flush(self) -> None:
        self.armed = False
        now = self.loop.time()
        if self.queue:
            self.relay.learn_lateness(now - self.queue[0][0])
        out = []
        horizon = now + self.relay.lateness
        while self.queue and self.queue[0][0] <= horizon:
            out.append(self.queue.popleft()[1])
        if out:
            data = b"".join(out)
            self.queued -= len(data)
            if not self.dst.is_closing():
                self.dst.write(data)
        if self.src_paused_by_queue and self.queued < QUEUE_LOW:
            self.src_paused_by_queue = False
            if not self.src.is_closing():
                self.src.resume_reading()
        if self.queue:
            self._arm()
        elif self.eof:
            self._finish()

    def close_after_flush(self) -> None:
        """The source sent EOF (or went away): pass it on once every byte before it is out."""
        self.eof = True
        if not self.queue and not self.armed:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.close()
        if not self.dst.is_closing():
            if self.dst.can_write_eof():
                self.dst.write_eof()
            else:
                self.dst.close()
        self.on_done()


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; `pipe` carries what it receives to the other side."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.pipe: DelayedPipe | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.pipe is None:
            self.early.append(data)
        else:
            self.pipe.feed(data)

    def eof_received(self) -> bool:
        if self.pipe is not None:
            self.pipe.close_after_flush()
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc) -> None:
        if self.pipe is not None:
            self.pipe.close_after_flush()
        self.conn.side_lost()

    # The other side cannot take more: stop reading from this side's peer.
    def pause_writing(self) -> None:
        other = self.conn.other(self)
        if other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.conn.other(self)
        if other.transport is not None and not other.transport.is_closing():
            other.transport.resume_reading()


class _Inbound(_Side):
    """The redirected client socket: held paused until the outbound connection is up."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.pause_reading()
        self.conn.starting = asyncio.get_running_loop().create_task(self.conn.start())


class Connection:
    """A client connection redirected to the relay and its twin dialed to the real service."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.inbound = _Inbound(self)
        self.outbound = _Side(self)
        self.finished = 0
        self.starting: asyncio.Task | None = None  # a reference, so the task is not collected
        relay.connections += 1

    def other(self, side: _Side) -> _Side:
        return self.outbound if side is self.inbound else self.inbound

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tin = self.inbound.transport
        try:
            host, port = original_destination(tin.get_extra_info("socket"))
            await loop.create_connection(lambda: self.outbound, host, port)
        except OSError as e:
            log.warning("cannot reach the original destination: %s", e)
            tin.abort()
            return
        tout = self.outbound.transport
        self.inbound.pipe = DelayedPipe(self.relay, loop, tin, tout, self.pipe_done)
        self.outbound.pipe = DelayedPipe(self.relay, loop, tout, tin, self.pipe_done)
        for side in (self.inbound, self.outbound):
            for chunk in side.early:
                side.pipe.feed(chunk)
            side.early.clear()
        tin.resume_reading()

    def pipe_done(self) -> None:
        self.finished += 1
        if self.finished == 2:
            self.close()

    def side_lost(self) -> None:
        # A reset or full close on one side: the other pipe still delivers what it holds.
        for side in (self.inbound, self.outbound):
            if side.pipe is None and side.transport is not None:
                side.transport.close()

    def close(self) -> None:
        for side in (self.inbound, self.outbound):
            if side.pipe is not None and side.pipe.timer is not None:
                side.pipe.timer.close()
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self.relay.connections -= 1


async def serve(relay: Relay, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(relay).inbound, host, port, reuse_address=True, backlog=512)
    if relay.control is not None:
        loop.add_signal_handler(signal.SIGHUP, relay.reload)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("relay on %s:%d, delay %.3f ms", host, port, relay.delay * 1000)
    async with server:
        await stop.wait()


def _fine_timers() -> None:
    """Ask the kernel for 1 ns timer slack (default 50 us) so the relay wakes when it asked to."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_node.testbed.relay", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    p.add_argument("--control", type=Path, default=None, help="file with the delay in ms, re-read on SIGHUP")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay: %(message)s", datefmt="%H:%M:%S")
    _fine_timers()
    relay = Relay(args.delay_ms / 1000.0, args.control)
    if args.control is not None and args.control.exists():
        relay.reload()
    asyncio.run(serve(relay, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
