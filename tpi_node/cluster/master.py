"""The master: the gRPC server workers dial (Join, FetchShard, Session, Status), the partition
plan over its members, the shard cache it serves from, and the ClusterDriver the engine steps.

Life of a cluster: the master counts itself as rank 0 and waits until `nodes` members joined;
then it makes the plan (make_plan over their capacities), slices every rank's shards from the
checkpoint (lazily, one layer at a time, sha256 per file), answers every waiting Join with its
rank and file manifest, and opens its own NodeRunner with the StarHub collective. The cluster is
ready when every worker has a Session. A worker that rejoins with the same node id gets the same
rank (and its cached shards stay valid); a stranger is refused while the plan is complete.
"""
from __future__ import annotations

import asyncio
import time
import contextlib
import logging
import threading
from pathlib import Path

import grpc
import torch

from tpi_node import __version__
from tpi_node.cluster.join_auth import MasterAuth
from tpi_node.comm.codec import dtype_enum, to_proto
from tpi_node.comm.star import CHANNEL_OPTIONS, Peer, PeerLost, SharedLoop, StarHub
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.client import ClusterNotReady
from tpi_node.engine.node import open_runner
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.proto import tpi_pb2_grpc as rpc
from tpi_node.weights.checkpoint import model_digest
from tpi_node.weights.plan import NodeCapacity, PartitionPlan, PlanError, make_plan
from tpi_node.weights.slicer import shard_dir, write_node_shards

log = logging.getLogger("tpi_node.master")

CHUNK = 1 << 20          # FetchShard chunk size (bytes)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ClusterMaster(rpc.MasterServicer):
    def __init__(self, model_dir: Path, cfg: ModelConfig, capacity: NodeCapacity, *, nodes: int = 1,
                 dtype: str = "fp32", wire: str = "fp32", window: int | None = None, device: str = "cpu",
                 token: str | None = None, peer_timeout_s: float = 5.0, tls=None,
                 auto_admit: bool = False, collective: str = "star") -> None:
        self.model_dir, self.cfg, self.nodes = Path(model_dir), cfg, nodes
        self.dtype, self.wire, self.window, self.device = dtype, wire, window, device
        self.peer_timeout_s = peer_timeout_s
        self.collective = collective        # "star", or "gloo": a torch.distributed ring sums instead
        self.collective_init = ""            # tcp://HOST:PORT of the gloo group, set at start()
        self.digest = model_digest(model_dir)
        self.config_json = (self.model_dir / "config.json").read_text()
        self.auth = MasterAuth(token)
        self.shared = SharedLoop(background=True)
        self.members: list[tuple[NodeCapacity, str]] = [(capacity, "master")]
        self.plan: PartitionPlan | None = None
        self.hub: StarHub | None = None
        self.runner = None
        self.manifests: dict[int, dict[str, tuple[int, str]]] = {}   # rank -> file -> (size, sha256)
        self.error: str | None = None          # why the plan could not be formed
        self.server = None
        self.bound_port = 0
        self._formed = threading.Event()
        self._formed_async: asyncio.Event | None = None
        self._form_lock: asyncio.Lock | None = None
        # membership changes (cluster/replan.py): lost workers, joins at idle points, heartbeats
        self.tls, self.auto_admit = tls, auto_admit
        self.replan_lock = threading.Lock()
        self.pending: dict[str, tuple] = {}            # node id -> (capacity, address, admitted event)
        self.lost_members: list[tuple[NodeCapacity, str]] = []
        self.unservable: str | None = None             # why the survivors cannot serve the model
        self.state = "waiting for nodes"
        self.windows: dict[int, int | None] = {}
        self.stopped = False

    # ---- start / stop ----------------------------------------------------------------------
    def start(self, address: str) -> int:
        """Serve gRPC on `address` (host:port, port 0 = any); returns the bound port."""
        async def _start():
            self._formed_async, self._form_lock = asyncio.Event(), asyncio.Lock()
            self.server = grpc.aio.server(options=CHANNEL_OPTIONS)
            rpc.add_MasterServicer_to_server(self, self.server)
            if self.tls is not None:
                from tpi_node.cluster.tls import server_credentials
                port = self.server.add_secure_port(address, server_credentials(self.tls))
            else:
                port = self.server.add_insecure_port(address)
            if port == 0:
                raise UserError(f"cannot listen for workers on {address}")
            await self.server.start()
            self.bound_port = port
            if self.collective == "gloo":
                # workers reach this port at the address they dial the master by (empty host)
                self.collective_init = f"tcp://:{_free_port()}"
            from tpi_node.cluster.replan import watch_heartbeats
            self._watcher = asyncio.get_running_loop().create_task(watch_heartbeats(self))
            if self.nodes == 1:
                await self._form()
            return port
        return self.shared.run(_start())

    def stop(self, reason: str = "the master is shutting down") -> None:
        self.stopped = True
        async def _stop():
            if self.hub is not None:
                for p in list(self.hub.peers.values()):
                    with contextlib.suppress(Exception):
                        await p.write(pb.MasterMsg(shutdown=pb.Shutdown(reason=reason)))
            if self.server is not None:
                await self.server.stop(0.5)
        with contextlib.suppress(Exception):
            self.shared.run(_stop(), timeout=5)
        self.shared.close()

    # ---- the plan ----------------------------------------------------------------------------
    async def _form(self) -> None:
        """Make the plan over the members, slice every rank's shards, open rank 0's runner."""
        caps = [c for c, _ in self.members]
        loop = asyncio.get_running_loop()
        try:
            plan = make_plan(self.cfg, caps, self.digest)
            log.info("plan %s over %d nodes: %s", plan.digest[:12], plan.world_size,
                     ", ".join(f"{s.node_id}: kv {s.kv_start}-{s.kv_end} ffn {s.ffn_start}-{s.ffn_end}"
                               for s in plan.shares))
            from tpi_node.cluster.replan import windows_for
            self.windows = windows_for(self, plan, caps)      # PlanError when a node cannot hold its share
            if self.window is None:
                self.window = self.windows[0]
            self.hub = StarHub(self.shared, plan.world_size, self.wire, self.peer_timeout_s)
            await loop.run_in_executor(None, self._slice_all, plan)
            self.plan = plan
            self.state = "ready"
        except (PlanError, UserError, OSError) as e:
            self.error = str(e)
            log.error("cannot form the cluster: %s", e)
        self._formed_async.set()
        self._formed.set()

    def _slice_all(self, plan: PartitionPlan) -> None:
        for rank in range(1, plan.world_size):
            out = shard_dir(self.digest, plan, rank, self.dtype)
            sums = write_node_shards(self.model_dir, self.cfg, plan, rank, out, self.dtype, progress=True)
            self.manifests[rank] = {f: ((out / f).stat().st_size, h) for f, h in sums.items()}
        self.runner = open_runner(self.model_dir, self.cfg, plan, 0, self._collective(plan), self.dtype,
                                  self.window, self.device, progress=True)

    def _collective(self, plan: PartitionPlan):
        """What sums the partial sums: the StarHub, or a gloo ring (the Session stream still
        carries the steps; the hub then only broadcasts them)."""
        if self.collective != "gloo" or plan.world_size == 1:
            return self.hub
        from tpi_node.comm.torch_dist import GlooCollective

        return GlooCollective(self.collective_init.replace("tcp://:", "tcp://127.0.0.1:"), 0, plan.world_size, self.wire,
                              timeout_s=max(30.0, self.peer_timeout_s), lazy=True)

    def wait_formed(self, timeout: float | None = None) -> bool:
        return self._formed.wait(timeout)

    def ready(self) -> bool:
        return self.runner is not None and self.hub is not None and not self.hub.missing()

    # ---- RPCs ----------------------------------------------------------------------------------
    async def Challenge(self, request, context):
        return self.auth.challenge(request)

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        refuse = self._refusal(request)
        if refuse is None and self.plan is None and not self._formed_async.is_set():
            ids = [c.node_id for c, _ in self.members]
            cap = request.capacity
            me = NodeCapacity(request.node_id, int(cap.memory_bytes), max(1, int(cap.cores)),
                              int(cap.disk_bytes), cap.speed if cap.HasField("speed") else None)
            if request.node_id in ids:
                self.members[ids.index(request.node_id)] = (me, request.address or context.peer())
            else:
                self.members.append((me, request.address or context.peer()))
            log.info("node %s joined (%d of %d)", request.node_id, len(self.members), self.nodes)
            async with self._form_lock:
                if len(self.members) >= self.nodes and not self._formed_async.is_set():
                    await self._form()
            await self._formed_async.wait()
            refuse = self.error
        elif refuse is None:
            await self._formed_async.wait()
            refuse = self.error
        if refuse is None:
            refuse = await self._admit(request, context)
        if refuse is not None:
            log.warning("refused node %s: %s", request.node_id, refuse)
            return pb.JoinReply(accepted=False, reason=refuse, version=__version__)
        rank = [s.node_id for s in self.plan.shares].index(request.node_id)
        files = [pb.ShardFile(name=f, size=size, sha256=h) for f, (size, h) in self.manifests[rank].items()]
        return pb.JoinReply(accepted=True, rank=rank, world_size=self.plan.world_size,
                            plan_json=self.plan.to_json(), plan_digest=self.plan.digest,
                            model_digest=self.digest, model_config_json=self.config_json, files=files,
                            wire_dtype=dtype_enum(self.hub.wire), shard_dtype=self.dtype,
                            version=__version__, model_name=self.model_dir.name,
                            ticket=self.auth.tickets.issue(request.node_id),
                            collective_init=self.collective_init if self.collective == "gloo" else "")

    async def _admit(self, request: pb.JoinRequest, context) -> str | None:
        """A node of the current plan is welcome at once; another one (a lost worker back, or a new
        one with --auto-admit) waits for the next idle point, when the master re-plans with it."""
        from tpi_node.cluster import replan
        ids = [s.node_id for s in self.plan.shares]
        if request.node_id in ids and ids.index(request.node_id) != 0:
            return None
        if request.node_id == ids[0] or not replan.may_admit(self, request.node_id, self.auto_admit):
            return (f"the cluster is complete ({self.plan.world_size} nodes, plan {self.plan.digest[:12]}); "
                    f"start the master with --auto-admit to admit new nodes")
        cap = request.capacity
        me = NodeCapacity(request.node_id, int(cap.memory_bytes), max(1, int(cap.cores)), int(cap.disk_bytes),
                          cap.speed if cap.HasField("speed") else None)
        await replan.pending_join(self, me, request.address or context.peer()).wait()
        ids = [s.node_id for s in self.plan.shares]
        return None if request.node_id in ids else "the master could not admit this node; join again"

    def _refusal(self, request: pb.JoinRequest) -> str | None:
        if request.version != __version__:
            return f"this master runs tpi-node {__version__}; the worker runs {request.version or 'unknown'}"
        if request.model_digest and request.model_digest != self.digest:
            return (f"this master serves model {self.model_dir.name} ({self.digest[:12]}), "
                    f"not {request.model_digest[:12]}")
        if not request.node_id:
            return "the worker sent no node id"
        return self.auth.refusal(request)

    async def FetchShard(self, request: pb.ShardRequest, context):
        plan = self.plan
        if plan is None or request.plan_digest != plan.digest or request.rank not in self.manifests:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no such plan or rank on this master")
        if (plan.share_of(request.rank).node_id != request.node_id
                or not self.auth.tickets.check(request.node_id, bytes(request.ticket))):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "join first: no valid ticket for this rank")
        if request.name not in self.manifests[request.rank]:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no shard file '{request.name}' for rank {request.rank}")
        size, sha = self.manifests[request.rank][request.name]
        path = shard_dir(self.digest, plan, request.rank, self.dtype) / request.name
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(CHUNK)
                last = offset + len(data) >= size
                yield pb.ShardChunk(name=request.name, offset=offset, data=data, total_size=size,
                                    sha256=sha if offset == 0 or last else "", last=last)
                offset += len(data)
                if last or not data:
                    return

    async def Session(self, request_iterator, context):
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            return
        h, plan = first.hello, self.plan
        why = None
        if plan is None:
            why = "the cluster has no plan yet; join first"
        elif h.plan_digest != plan.digest:
            why = f"plan {h.plan_digest[:12]} is not the current plan {plan.digest[:12]}; join again"
        elif not 1 <= h.rank < plan.world_size or plan.share_of(h.rank).node_id != h.node_id:
            why = f"rank {h.rank} does not belong to node {h.node_id} in the current plan"
        elif not self.auth.tickets.check(h.node_id, bytes(h.ticket)):
            why = f"node {h.node_id} did not show the ticket of its join; join again"
        if why is not None:
            await context.write(pb.MasterMsg(shutdown=pb.Shutdown(reason=why)))
            return
        log.info("node %s (rank %d) connected", h.node_id, h.rank)
        peer = Peer(h.rank, h.node_id, context)
        await self.hub.serve_peer(peer)
        log.warning("node %s (rank %d) left: %s", h.node_id, h.rank, peer.lost)

    async def Status(self, request, context) -> pb.StatusReply:
        nodes = [pb.NodeStatus(**{k: v for k, v in n.items() if k in pb.NodeStatus.DESCRIPTOR.fields_by_name})
                 for n in self._node_rows()]
        return pb.StatusReply(ready=self.ready(), version=__version__, model_digest=self.digest,
                              plan_digest=self.plan.digest if self.plan else "", expected_nodes=self.nodes,
                              nodes=nodes)

    # ---- /health ------------------------------------------------------------------------------
    def _node_rows(self) -> list[dict]:
        addr = {c.node_id: a for c, a in self.members}
        if self.plan is None:
            return [{"node_id": c.node_id, "address": a, "connected": True} for c, a in self.members]
        rows = []
        for s in self.plan.shares:
            peer = self.hub.peers.get(s.rank) if self.hub else None
            rows.append({"node_id": s.node_id, "rank": s.rank, "address": addr.get(s.node_id, ""),
                         "connected": s.rank == 0 or (peer is not None and peer.lost is None),
                         "kv_start": s.kv_start, "kv_end": s.kv_end, "ffn_start": s.ffn_start, "ffn_end": s.ffn_end})
        return rows

    def cluster_info(self) -> dict:
        """For /health: one entry per node with its share of KV heads and FFN columns."""
        nodes = [{"id": n["node_id"], "rank": n.get("rank"), "address": n["address"], "connected": n["connected"],
                  "kv_heads": [n.get("kv_start"), n.get("kv_end")], "ffn_columns": [n.get("ffn_start"), n.get("ffn_end")]}
                 for n in self._node_rows()]
        return {"nodes": nodes, "plan": self.plan.digest[:16] if self.plan else None}


class ClusterDriver:
    """The engine's Driver over the cluster: every step goes to the workers first (Step frame),
    then the master runs its own slice; the StarHub meets the workers' partials per layer."""

    def __init__(self, master: ClusterMaster) -> None:
        self.master = master
        self.step_id = 0
        self.live: set[int] = set()        # sequences with KV cache on the nodes (empty = idle point)
        from tpi_node.cluster.replan import start_admitter
        start_admitter(master, lambda: not self.live)

    def ready(self) -> bool:
        """Ready, or a worker was lost and the survivors may take over: the next step recovers."""
        from tpi_node.cluster.replan import recoverable
        return self.master.ready() or recoverable(self.master)

    def step(self, layout: BatchLayout, x: torch.Tensor) -> torch.Tensor:
        m = self.master
        if not m.ready():
            missing = m.hub.missing() if m.hub else []
            raise ClusterNotReady(f"the cluster is not ready (waiting for rank(s) {missing})" if missing
                                  else "the cluster is not ready")
        with m.replan_lock, m.shared.borrow():
            self.hub_at_step = m.hub
            self.live.update(layout.seq_ids)
            self.step_id += 1
            m.hub.begin_step(self.step_id)
            msg = pb.MasterMsg(step=pb.Step(step_id=self.step_id, layout=pb.BatchLayout(
                seq_ids=layout.seq_ids, past_lens=layout.past_lens, new_lens=layout.new_lens)))
            to_proto(x, out=msg.step.hidden)            # the compute dtype, lossless
            try:
                m.shared.run(m.hub.broadcast(msg))
                out = m.runner.forward(layout, x)
                if m.collective == "gloo":      # no partial came over the streams, but the ring
                    now = time.monotonic()      # completed: every worker is alive
                    for p in m.hub.peers.values():
                        p.last_seen = now
                return out
            except Exception as e:
                m.runner.free(list(layout.seq_ids))
                m.shared.run(self._abort(str(e)))
                if isinstance(e, PeerLost):
                    from tpi_node.cluster.replan import lost_node_ids
                    lost = lost_node_ids(m)
                    if lost:
                        raise PeerLost(f"lost node(s) {', '.join(lost)}: {e}") from None
                raise

    async def _abort(self, reason: str) -> None:
        abort = pb.MasterMsg(abort=pb.Abort(step_id=self.step_id, reason=reason))
        for p in list(self.master.hub.peers.values()):
            if p.lost is None:
                with contextlib.suppress(Exception):
                    await p.write(abort)

    def free(self, seq_ids) -> None:
        m = self.master
        self.live.difference_update(seq_ids)
        with m.replan_lock, m.shared.borrow():
            with contextlib.suppress(PeerLost):
                m.shared.run(m.hub.broadcast(pb.MasterMsg(free=pb.Free(seq_ids=list(seq_ids)))))
            m.runner.free(seq_ids)

    def recover(self, error: BaseException) -> bool:
        """A worker was lost mid-step: re-plan over the survivors (cluster/replan.py); the engine
        then replays every running sequence into the new caches. False: the survivors cannot."""
        from tpi_node.cluster.replan import recover
        if self.master.collective == "gloo":
            log.error("a gloo ring cannot re-plan around a lost node (use the star): failing the requests")
            ok = False
        else:
            ok = recover(self.master, error, getattr(self, "hub_at_step", None))
        if not ok:
            self.live.clear()             # the engine fails every running sequence
        return ok

    def stats(self) -> dict:
        r = self.master.runner
        if r is None:
            return {}
        return {"master": {**r.stats.as_dict(), **r.store.stats.as_dict(), "kv_bytes": r.kv.nbytes()}}
