"""The control plane of a running plan: the master's end of every worker's Session stream.

`Sessions` owns who is connected for one plan (rank -> Peer), reads each worker's frames (Partial
frames go to the data plane, comm/star.py, through `partials`; heartbeats and errors stay here),
decides when a silent worker is lost, and ends sessions with a ShutdownCode. It is the StarHub's
`HubLinks`: the hub sends its sums through it and learns from it who is missing.

Liveness. A worker beats every second while idle; during a step its frames (or, with gloo, the
step completing at all) show it is alive, and the collective's own timeout catches a lost one.
So only time outside steps counts as silence: a worker is lost after HEARTBEAT_TIMEOUT_S without
a frame since the later of its last frame and the end of the last step.

A session runs on the worker's gRPC stream or, for a worker on this machine, on the master's Unix
socket (cluster/unix_session.py). The frames of a Unix-socket session are read by `serve` on the
event loop, and also by `poll`, which the hub calls while it waits for partial sums: it spins on
those sockets without the event loop's wake-ups. Either way every frame goes through `_dispatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import grpc

from tpi_node.cluster.unix_session import FrameSocket
from tpi_node.comm.lane import Lane, LaneError
from tpi_node.comm.loop import SharedLoop
from tpi_node.comm.spin import SpinBudget
from tpi_node.comm.star import PeerLost, StarHub
from tpi_node.proto import tpi_pb2 as pb

log = logging.getLogger("tpi_node.sessions")

HEARTBEAT_S = 1.0  # a worker's beat while idle
HEARTBEAT_TIMEOUT_S = 2.5  # two and a half missed beats
_TICK_S = 0.25


def shutdown_msg(code: int, reason: str) -> pb.MasterMsg:
    return pb.MasterMsg(shutdown=pb.Shutdown(code=code, reason=reason))


class Peer:
    """The master's end of one worker's Session stream."""

    def __init__(self, rank: int, node_id: str, context) -> None:
        self.rank, self.node_id, self.context = rank, node_id, context
        self.lost: str | None = None  # why the session ended; None while live
        self.last_seen = time.monotonic()
        self.write_lock = asyncio.Lock()
        self.local = isinstance(context, FrameSocket)  # a Unix-socket session: a worker on this machine
        self.lane: Lane | None = None  # its shared-memory lane, when its Hello named one (comm/lane.py)

    async def write(self, msg: pb.MasterMsg) -> None:
        async with self.write_lock:
            await self.context.write(msg)

    def name(self) -> str:
        return f"node {self.node_id} (rank {self.rank})"


class Sessions:
    def __init__(self, shared: SharedLoop, world_size: int, node_ids: tuple[str, ...] = ()) -> None:
        self.shared, self.world_size = shared, world_size
        self.node_ids = node_ids  # rank -> node id of the plan (names for messages before a session)
        self.peers: dict[int, Peer] = {}
        self.partials: StarHub | None = None  # where Partial frames go (None: another collective sums)
        self.in_step = False
        self.last_step_end = time.monotonic()
        self.attaches = 0  # sessions opened so far: each one is a node whose KV cache starts empty
        self.spin = SpinBudget()  # how long `poll` waits for local workers' frames

    # ---- HubLinks (comm/star.py) ----------------------------------------------------------------
    def missing(self) -> list[int]:
        """Ranks without a live session."""
        return [r for r in range(1, self.world_size) if r not in self.peers or self.peers[r].lost]

    def name(self, rank: int) -> str:
        if rank in self.peers:
            return self.peers[rank].name()
        return f"node {self.node_ids[rank]} (rank {rank})" if rank < len(self.node_ids) else f"rank {rank}"

    def why_lost(self, rank: int) -> str | None:
        p = self.peers.get(rank)
        return p.lost if p is not None else None

    async def send(self, rank: int, msg: pb.MasterMsg) -> None:
        await self.peers[rank].write(msg)

    def lane(self, rank: int) -> Lane | None:
        p = self.peers.get(rank)
        return p.lane if p is not None and p.lost is None else None

    def refuse(self, rank: int, reason: str) -> None:
        """End `rank`'s session because of a malformed frame (the worker exits with this reason)."""
        peer = self.peers[rank]
        peer.lost = reason
        asyncio.get_running_loop().create_task(self._quietly(peer, shutdown_msg(pb.MALFORMED_FRAME, reason)))

    # ---- sessions --------------------------------------------------------------------------------
    async def serve(self, peer: Peer, lane: str = "") -> None:
        """Read a worker's frames until its stream ends (runs as the Session RPC handler). `lane`:
        the shared-memory lane its Hello named (a worker on this machine), mapped here first."""
        if lane:
            try:
                if not peer.local:
                    raise LaneError("a shared-memory lane needs a session on this machine's Unix socket")
                peer.lane = Lane.open(lane)
            except LaneError as e:
                await peer.write(shutdown_msg(pb.REFUSED, f"{peer.name()}: {e}"))
                return
        self._attach(peer)
        reason = "disconnected"
        try:
            while peer.lost is None:
                msg = await peer.context.read()
                if msg is grpc.aio.EOF:
                    reason = (peer.local and peer.context.ended) or reason
                    break
                ended = self._dispatch(peer, msg)
                if ended is not None:
                    reason = ended
                    break
        except (grpc.RpcError, asyncio.CancelledError, ConnectionError) as e:
            reason = f"disconnected ({type(e).__name__})"
        finally:
            self._detach(peer, peer.lost or reason)
            async with peer.write_lock:  # a write in flight (a shutdown) ends before the RPC does
                pass

    def _dispatch(self, peer: Peer, msg: pb.WorkerMsg) -> str | None:
        """One frame of `peer`: partial sums to the hub, an error ends the session (-> why)."""
        peer.last_seen = time.monotonic()
        kind = msg.WhichOneof("kind")
        if kind == "partial" and self.partials is not None:
            self.partials.deliver(peer.rank, msg.partial)
        elif kind == "partial":
            self.refuse(peer.rank, "sent a partial sum on the session stream; this cluster sums over gloo")
        elif kind == "error":
            return f"reported an error: {msg.error.message}"
        return None

    def poll(self, has_frame: Callable[[int], bool]) -> None:
        """Read what the Unix-socket sessions sent, without the event loop, spinning up to the
        spin budget (yielding the core each turn) until `has_frame(rank)` for each of them (a
        gRPC session's frames come only through the loop, which the caller runs next). A session
        found ended is detached here: the hub's next look at `missing()` sees it."""
        local = [p for p in self.peers.values() if p.local and p.lost is None]
        if not local:
            return
        deadline = time.perf_counter() + self.spin.s
        while True:
            for p in local:
                msg = p.context.poll()
                while msg is not None and p.lost is None:
                    ended = p.context.ended if msg is grpc.aio.EOF else self._dispatch(p, msg)
                    if ended is not None:
                        self._detach(p, ended)
                        p.context.cancel()  # its `serve` reads END and ends
                        break
                    msg = p.context.poll()
            local = [p for p in local if p.lost is None]
            waiting = [p for p in local if not has_frame(p.rank)]
            if not waiting or time.perf_counter() >= deadline:
                self.spin.spent(not waiting)
                return
            os.sched_yield()

    def _attach(self, peer: Peer) -> None:
        old = self.peers.get(peer.rank)
        if old is not None and old is not peer:
            self._detach(old, "replaced by a new session")
        self.peers[peer.rank] = peer
        self.attaches += 1
        if self.partials is not None:
            self.partials.link_opened(peer.rank)

    def _detach(self, peer: Peer, reason: str) -> None:
        if peer.lost is None:
            peer.lost = reason
        if self.peers.get(peer.rank) is peer and self.partials is not None:
            self.partials.link_lost(peer.rank, f"{peer.name()} {reason}")
        if peer.lane is not None:  # nobody reads it now (`lane` answers None for a lost peer)
            peer.lane.close()

    def any_lost(self) -> bool:
        """A worker that had a session has lost it."""
        return any(p.lost for p in list(self.peers.values()))

    # ---- frames to every worker ------------------------------------------------------------------
    async def broadcast(self, msg: pb.MasterMsg) -> None:
        """Send one frame to every worker of the plan (Step, Free); PeerLost when one is missing."""
        for r in range(1, self.world_size):
            p = self.peers.get(r)
            if p is None or p.lost:
                why = f" ({p.lost})" if p is not None else ""
                raise PeerLost(f"{self.name(r)} is not connected{why}")
            await p.write(msg)

    async def send_all(self, msg: pb.MasterMsg) -> None:
        """Send one frame to every live session, ignoring the ones that fail (Abort, Shutdown)."""
        for p in list(self.peers.values()):
            if p.lost is None:
                await self._quietly(p, msg)

    def shutdown_all(self, code: int, reason: str) -> None:
        """End every live session with `code` (from any thread; waits at most a few seconds)."""

        async def _all() -> None:
            live = [p for p in list(self.peers.values()) if p.lost is None]
            for p in live:  # first: a worker that closes its stream at once (a Unix socket's
                p.lost = reason  # within microseconds) ends for this reason, not "disconnected"
            for p in live:
                await self._quietly(p, shutdown_msg(code, reason))

        with contextlib.suppress(Exception):
            self.shared.run(_all(), timeout=10)

    @staticmethod
    async def _quietly(peer: Peer, msg: pb.MasterMsg) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(peer.write(msg), 5)

    # ---- liveness --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self):
        """Around one forward step: time inside it is not silence (see the module docstring)."""
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
            self.last_step_end = time.monotonic()

    def silent(self, now: float, timeout_s: float) -> list[Peer]:
        """Live peers that sent nothing for `timeout_s` outside steps."""
        if self.in_step:
            return []
        since = self.last_step_end
        return [p for p in list(self.peers.values()) if p.lost is None and now - max(p.last_seen, since) > timeout_s]

    def drop_silent(self, now: float, timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        """On the loop: declare lost (and tell to join again) every peer silent for `timeout_s`."""
        for p in self.silent(now, timeout_s):
            log.warning("%s sent no heartbeat for %.1f s: lost", p.name(), now - p.last_seen)
            self._detach(p, f"sent no heartbeat for {timeout_s:g} s")
            # should it wake up again, it joins again and is admitted at an idle moment
            reason = f"no heartbeat for {timeout_s:g} s; join again"
            asyncio.get_running_loop().create_task(self._quietly(p, shutdown_msg(pb.REJOIN, reason)))


async def watch_heartbeats(current, stopped) -> None:
    """On the master's loop: every tick, drop the silent peers of `current()` (the Sessions of
    the plan in force, or None) until `stopped()`. A tick that comes late means the loop was
    busy (borrowed by a step): frames may be queued, so that tick judges nobody."""
    last = time.monotonic()
    while not stopped():
        await asyncio.sleep(_TICK_S)
        now = time.monotonic()
        late, last = now - last > 3 * _TICK_S, now
        sessions = current()
        if sessions is not None and not late:
            sessions.drop_silent(now)
