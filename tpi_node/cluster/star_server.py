"""A star allreduce with real sessions but no plan, join or shards: the master end that
benchmarks (scripts/bench_allreduce.py, bench_testbed.py) and the collective's tests dial with
cluster/link.py `join_star`. The cluster's master (cluster/master.py) runs the same Sessions and
StarHub behind its Join and ticket checks."""

from __future__ import annotations

import asyncio
import time

import grpc

from tpi_node.cluster.channels import listen, new_server
from tpi_node.cluster.sessions import Peer, Sessions, shutdown_msg
from tpi_node.cluster.unix_session import UnixSessionServer
from tpi_node.comm.loop import SharedLoop
from tpi_node.comm.star import PeerLost, StarHub
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.proto import tpi_pb2_grpc as rpc


class _SessionOnly(rpc.MasterServicer):
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    async def Session(self, request_iterator, context):
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            return
        rank = first.hello.rank
        if not 1 <= rank < self.sessions.world_size:
            await context.write(shutdown_msg(pb.REFUSED, f"rank {rank} is not in this plan"))
            return
        await self.sessions.serve(Peer(rank, first.hello.node_id, context), first.hello.lane)


class StarServer:
    """hub = StarServer(3, "127.0.0.1:0").hub; ... hub.allreduce(t); server.close()"""

    def __init__(
        self,
        world_size: int,
        address: str,
        wire: str = "fp32",
        timeout_s: float = 5.0,
        shared: SharedLoop | None = None,
        unix_dir: str = "",
    ) -> None:
        """`unix_dir`: also take sessions on a Unix socket there (cluster/unix_session.py;
        `socket_path`), as a master does for workers on its machine."""
        self.shared = shared or SharedLoop(background=False)
        self.sessions = Sessions(self.shared, world_size)
        self.hub = StarHub(self.shared, world_size, self.sessions, wire, timeout_s)
        self.sessions.partials = self.hub

        self.unix: UnixSessionServer | None = None
        servicer = _SessionOnly(self.sessions)

        async def _start():
            server = new_server()
            rpc.add_MasterServicer_to_server(servicer, server)
            port = listen(server, address, None)
            await server.start()
            if unix_dir:
                self.unix = UnixSessionServer(servicer.Session, unix_dir)
                self.unix.start()
            return server, port

        self.server, self.port = self.shared.run(_start())
        self.socket_path = self.unix.path if self.unix else ""

    def wait_for_peers(self, timeout_s: float = 30.0) -> None:
        """Block until every worker rank has a live session (or raise PeerLost)."""
        deadline = time.monotonic() + timeout_s
        while self.sessions.missing():
            if time.monotonic() > deadline:
                raise PeerLost(f"rank(s) {self.sessions.missing()} did not connect within {timeout_s:g} s")
            self.shared.run(asyncio.sleep(0.01))

    def close(self) -> None:
        self.shared.run(self.server.stop(0))
        if self.unix is not None:
            self.shared.run(self.unix.stop())
        self.shared.loop.close()
