"""The master's gRPC server: the RPCs workers call (Challenge, Join, FetchShard, Session, Status).

Life of a cluster: the master counts itself as rank 0 and waits until `expected` members joined;
then the Coordinator makes the plan, slices every rank's shards from the checkpoint (lazily, one
layer at a time, sha256 per file), every waiting Join is answered with its Assignment (rank and
file manifest), and rank 0 opens its own runner. The cluster is ready when every worker has a
Session. A worker that rejoins with the same node id gets the same rank (and its cached shards
stay valid); a stranger is refused while the plan is complete (or waits, with --auto-admit).

This file only speaks the protocol; membership is cluster/membership.py, changes to it are
cluster/coordinator.py, the sessions are cluster/sessions.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from tpi_node import __version__
from tpi_node.cluster.assignment import Assignment
from tpi_node.cluster.channels import listen, new_server
from tpi_node.cluster.coordinator import Coordinator
from tpi_node.cluster.deployment import ClusterSpec, MakeCollective
from tpi_node.cluster.join_auth import MasterAuth
from tpi_node.cluster.membership import ClusterState, Member, Membership
from tpi_node.cluster.sessions import Peer, shutdown_msg, watch_heartbeats
from tpi_node.cluster.tls import TlsFiles
from tpi_node.cluster.unix_session import UnixSessionServer
from tpi_node.comm.loop import SharedLoop
from tpi_node.errors import UserError
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.proto import tpi_pb2_grpc as rpc
from tpi_node.weights.plan import NodeCapacity
from tpi_node.weights.slicer import PartError, part_file, spans

log = logging.getLogger("tpi_node.master")

CHUNK = 1 << 20  # FetchShard chunk size (bytes)


def refuse_unauthenticated_ring(gloo: bool, token: str | None, tls: bool) -> None:
    """A gloo ring only in an open, plaintext cluster: torch.distributed's TCPStore and ring accept
    any connection to their ports, so the token and TLS would guard every channel but that one."""
    if gloo and (token or tls):
        given = " and ".join(w for w, on in (("a cluster token", token), ("TLS certificates", tls)) if on)
        raise UserError(
            f"--collective gloo cannot be used with {given}: torch.distributed's TCPStore and gloo ring "
            "take unauthenticated plaintext connections (anyone reaching their ports could join the ring "
            "or read the partial sums); use the default --collective star, which runs over the "
            "authenticated gRPC channel"
        )


class ClusterMaster(rpc.MasterServicer):
    def __init__(
        self,
        spec: ClusterSpec,
        capacity: NodeCapacity,
        make_collective: MakeCollective,
        *,
        nodes: int = 1,
        token: str | None = None,
        tls: TlsFiles | None = None,
        auto_admit: bool = False,
    ) -> None:
        refuse_unauthenticated_ring(bool(spec.collective_init), token, tls is not None)
        self.spec, self.tls = spec, tls
        self.auth = MasterAuth(token)
        self.shared = SharedLoop(background=True)
        self.membership = Membership(
            spec.cfg,
            spec.model_digest,
            spec.dtype,
            Member(capacity, "master"),
            nodes,
            auto_admit,
            context=spec.max_context,
            kv_blocks=spec.kv_blocks,
            weights=spec.weights,
            split_head=spec.split_head,
        )
        self.coordinator = Coordinator(spec, self.membership, self.shared, make_collective)
        self.server: grpc.aio.Server | None = None
        self.bound_port = 0
        self._formed: asyncio.Event | None = None  # made on the loop at start()
        self._joining: dict[str, str] = {}  # node id -> address of a Join waiting for the plan
        self._form_lock: asyncio.Lock | None = None
        self._watcher: asyncio.Task | None = None
        self.unix: UnixSessionServer | None = None  # sessions of workers on this machine

    # ---- start / stop -----------------------------------------------------------------------------
    def start(self, address: str) -> int:
        """Serve gRPC on `address` (host:port, port 0 = any); returns the bound port."""

        async def _start():
            self._formed, self._form_lock = asyncio.Event(), asyncio.Lock()
            self.server = new_server()
            rpc.add_MasterServicer_to_server(self, self.server)
            port = listen(self.server, address, self.tls)
            await self.server.start()
            self.bound_port = port
            self._listen_unix()
            self._watcher = asyncio.get_running_loop().create_task(
                watch_heartbeats(lambda: self.coordinator.sessions, lambda: self.coordinator.stopped)
            )
            if self.membership.expected == 1:
                await self._form()
            return port

        return self.shared.run(_start())

    def _listen_unix(self) -> None:
        """On the loop: the Unix socket local workers open their sessions on (cluster/unix_session.py);
        without one (no room for it in the temp directory) they all use gRPC."""
        try:
            self.unix = UnixSessionServer(self.Session)
        except OSError as e:
            log.warning("no Unix socket for local workers' sessions (%s): they use gRPC", e)
            return
        self.unix.start()

    async def _form(self) -> None:
        await self.coordinator.form()
        self._formed.set()

    def stop(self, reason: str = "the master is shutting down") -> None:
        if self.coordinator.stopped:
            return
        self.coordinator.stop(reason)

        async def _stop():
            if self.server is not None:
                await self.server.stop(0.5)
            if self.unix is not None:
                await self.unix.stop()

        with contextlib.suppress(Exception):
            self.shared.run(_stop(), timeout=5)
        if self.coordinator.deployment is not None:  # its runner, and its leases on the shard cache
            self.coordinator.deployment.close()
        self.shared.close()

    @property
    def stopped(self) -> bool:
        return self.coordinator.stopped

    def ready(self) -> bool:
        return self.coordinator.ready()

    # ---- Challenge / Join -----------------------------------------------------------------------------
    async def Challenge(self, request, context):
        return self.auth.challenge(request, context.peer())

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        m = self.membership
        member = Member(NodeCapacity.from_pb(request.node_id, request.capacity), request.address or context.peer())
        refuse = self._refusal(request)
        if refuse is None and request.node_id in self._joining:
            refuse = (
                f"node id {request.node_id} is already taken by a node waiting to join from "
                f"{self._joining[request.node_id]}; give every node its own id (--node-id, or its own TPI_HOME)"
            )
        waits = refuse is None and not self._formed.is_set()
        if waits:
            self._joining[request.node_id] = member.address
        try:
            if waits:
                m.add(member)
                async with self._form_lock:
                    if len(m.members) >= m.expected and m.state is ClusterState.WAITING:
                        await self._form()
            if refuse is None:
                await self._formed.wait()
                refuse = m.reason if m.state is ClusterState.FAILED else None
        finally:
            if waits:
                self._joining.pop(request.node_id, None)
        if refuse is None:
            refuse = await self._admit(member)
        if refuse is not None:
            log.warning("refused node %s: %s", request.node_id, refuse)
            return pb.JoinReply(accepted=False, reason=refuse, version=__version__)
        d = self.coordinator.deployment
        rank = m.rank_of(request.node_id)
        reply = Assignment(
            rank=rank,
            plan=d.plan,
            window=d.memory.windows[rank],
            kv_blocks=d.memory.kv_blocks,
            model_digest=self.spec.model_digest,
            model_config_json=self.spec.config_json(),
            files=tuple(d.manifests[rank]),
            wire=self.spec.wire,
            shard_dtype=self.spec.dtype,
            version=__version__,
            model_name=self.spec.model_name,
            ticket=self.auth.tickets.issue(request.node_id),
            collective_init=self.spec.collective_init,
            shard_quant=self.spec.quant,
            split_head=self.spec.split_head,
            act_quant=self.spec.act_quant,
        ).to_pb()
        if self.unix is not None:  # a worker on this machine may open its session there
            reply.session_socket = self.unix.path
        return reply

    async def _admit(self, member: Member) -> str | None:
        """A node of the current plan is welcome at once; another one (a lost worker back, or a new
        one with --auto-admit) waits for the next idle point, when the master re-plans with it."""
        m, node_id = self.membership, member.node_id
        rank = m.rank_of(node_id)
        if rank is not None and rank != 0:
            return None
        if rank == 0 or not m.may_admit(node_id):
            return (
                f"the cluster is complete ({m.plan.world_size} nodes, plan {m.plan.digest[:12]}); "
                f"start the master with --auto-admit to admit new nodes"
            )
        await m.wait_for_admission(member).wait()
        return None if m.rank_of(node_id) is not None else "the master could not admit this node; join again"

    def _refusal(self, request: pb.JoinRequest) -> str | None:
        if request.version != __version__:
            return f"this master runs tpi-node {__version__}; the worker runs {request.version or 'unknown'}"
        if request.model_digest and request.model_digest != self.spec.model_digest:
            return (
                f"this master serves model {self.spec.model_name} ({self.spec.model_digest[:12]}), "
                f"not {request.model_digest[:12]}"
            )
        if not request.node_id:
            return "the worker sent no node id"
        return self.auth.refusal(request)

    # ---- FetchShard / Session -------------------------------------------------------------------------
    async def FetchShard(self, request: pb.ShardRequest, context):
        d = self.coordinator.deployment
        if d is None or request.plan_digest != d.plan.digest or request.rank not in d.manifests:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no such plan or rank on this master")
        if d.plan.share_of(request.rank).node_id != request.node_id or not self.auth.tickets.check(
            request.node_id, bytes(request.ticket)
        ):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "join first: no valid ticket for this rank")
        files = {f.name: f for f in d.manifests[request.rank]}
        if request.name not in files:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no shard file '{request.name}' for rank {request.rank}")
        f = files[request.name]
        path = d.shard_dir(self.spec, request.rank) / f.name
        if request.part:  # some units of a layer file: cut, sent as a file of their own
            pieces = await self._part(d, request, path, context)
            for chunk in _chunks(f.name, pieces, sum(map(len, pieces)), ""):  # (the whole file's is checked)
                yield chunk
            return
        with open(path, "rb") as fh:
            for chunk in _chunks(f.name, iter(lambda: fh.read(CHUNK), b""), f.size, f.sha256):
                yield chunk

    async def _part(self, d, request: pb.ShardRequest, path, context) -> list[memoryview]:
        """Units [kv_start, kv_end) and [ffn_start, ffn_end) of a worker rank's layer file
        (weights/slicer.py read_part), cut on a pool thread, not on the loop."""
        have = spans(d.plan.share_of(request.rank))
        kv, ffn = (request.kv_start, request.kv_end), (request.ffn_start, request.ffn_end)
        if not request.name.startswith("layer-"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.name} has no units to cut")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, part_file, path, self.spec.cfg, have, kv, ffn)
        except PartError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Session(self, request_iterator, context):
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            return
        h, d = first.hello, self.coordinator.deployment
        code, why = pb.REJOIN, None
        if d is None:
            why = "the cluster has no plan yet; join first"
        elif h.plan_digest != d.plan.digest:
            why = f"plan {h.plan_digest[:12]} is not the current plan {d.plan.digest[:12]}; join again"
        elif not 1 <= h.rank < d.plan.world_size or d.plan.share_of(h.rank).node_id != h.node_id:
            code, why = pb.REFUSED, f"rank {h.rank} does not belong to node {h.node_id} in the current plan"
        elif not self.auth.tickets.check(h.node_id, bytes(h.ticket)):
            why = f"node {h.node_id} did not show the ticket of its join; join again"
        if why is not None:
            await context.write(shutdown_msg(code, why))
            return
        log.info("node %s (rank %d) connected", h.node_id, h.rank)
        peer = Peer(h.rank, h.node_id, context)
        await d.sessions.serve(peer, h.lane)
        log.warning("node %s (rank %d) left: %s", h.node_id, h.rank, peer.lost)

    # ---- Status, /health ----------------------------------------------------------------------------
    async def Status(self, request, context) -> pb.StatusReply:
        refuse = self.auth.status_refusal(request)
        if refuse is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refuse)
        d = self.coordinator.deployment
        return pb.StatusReply(
            ready=self.ready(),
            version=__version__,
            model_digest=self.spec.model_digest,
            plan_digest=d.plan.digest if d else "",
            expected_nodes=self.membership.expected,
            nodes=[pb.NodeStatus(**row) for row in self.node_rows()],
        )

    def node_rows(self) -> list[dict]:
        """One row per node (pb.NodeStatus fields): its share, and whether it is connected."""
        m, d = self.membership, self.coordinator.deployment
        addr = {x.node_id: x.address for x in m.members}
        if d is None:
            return [{"node_id": x.node_id, "address": x.address, "connected": True} for x in m.members]
        rows = []
        for s in d.plan.shares:
            peer = d.sessions.peers.get(s.rank)
            rows.append(
                {
                    "node_id": s.node_id,
                    "rank": s.rank,
                    "address": addr.get(s.node_id, ""),
                    "connected": s.rank == 0 or (peer is not None and peer.lost is None),
                    "kv_start": s.kv_start,
                    "kv_end": s.kv_end,
                    "ffn_start": s.ffn_start,
                    "ffn_end": s.ffn_end,
                }
            )
        return rows

    def cluster_info(self) -> dict:
        """For /health: one entry per node with its share of KV heads and FFN columns."""
        d = self.coordinator.deployment
        nodes = [
            {
                "id": n["node_id"],
                "rank": n.get("rank"),
                "address": n["address"],
                "connected": n["connected"],
                "kv_heads": [n.get("kv_start"), n.get("kv_end")],
                "ffn_columns": [n.get("ffn_start"), n.get("ffn_end")],
            }
            for n in self.node_rows()
        ]
        return {"nodes": nodes, "plan": d.plan.digest[:16] if d else None}


def _chunks(name: str, blocks, size: int, sha256: str):
    """A file's bytes (`blocks`, in order: a file read block by block, or a part's pieces) as
    FetchShard's chunks of at most CHUNK bytes, the first and the last with the sha256."""
    offset = 0
    for block in blocks:
        for a in range(0, len(block), CHUNK):
            data = bytes(block[a : a + CHUNK])
            last = offset + len(data) >= size
            yield pb.ShardChunk(
                name=name,
                offset=offset,
                data=data,
                total_size=size,
                sha256=sha256 if offset == 0 or last else "",
                last=last,
            )
            offset += len(data)
    if offset == 0:  # an empty file: one empty, last chunk
        yield pb.ShardChunk(name=name, offset=0, data=b"", total_size=size, sha256=sha256, last=True)
