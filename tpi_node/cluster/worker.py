"""The worker daemon (`tpi-node join`): Join the master, make sure its shard files are in the
local cache (sha256-checked; only missing or corrupt files are fetched), open them, then run the
layer loop for every Step the master sends, meeting the master in the star allreduce.

Everything runs on one thread: the gRPC loop is run by this thread whenever it waits (for the
next frame, or for a sum inside a step), so a frame reaches the code with no thread hand-off.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import grpc

from tpi_node import __version__
from tpi_node.comm.codec import FrameError, from_proto
from tpi_node.comm.star import PeerLost, SpokeLink, StarSpoke, StepAborted
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.forward import NodeRunner
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.weights.plan import NodeCapacity, PartitionPlan
from tpi_node.weights.slicer import DTYPES, sha256_file, shard_dir
from tpi_node.weights.store import ShardStore

_WIRE_NAMES = {pb.FLOAT32: "fp32", pb.BFLOAT16: "bf16", pb.FLOAT16: "fp16"}
HEARTBEAT_S = 1.0


def say(msg: str) -> None:
    print(f"[tpi-node] {msg}", file=sys.stderr, flush=True)


def worker_dir(reply: pb.JoinReply, plan: PartitionPlan) -> Path:
    """This worker's shard cache: named by model and plan digest (next to where a master on the
    same machine keeps the rank's source files, never the same folder)."""
    return shard_dir(reply.model_digest, plan, reply.rank, reply.shard_dtype).with_name(f"rank-{reply.rank}-worker")


async def _join(link: SpokeLink, request: pb.JoinRequest, token: str | None) -> pb.JoinReply:
    from tpi_node.cluster.auth import AuthError
    from tpi_node.cluster.join_auth import prove_join_async
    try:
        await prove_join_async(link.stub, token, request)
    except AuthError as e:
        raise UserError(f"cannot join the master at {link.address}: {e}") from None
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    return await link.stub.Join(request)        # waits until the master has formed the plan


async def _fetch(link: SpokeLink, reply: pb.JoinReply, out: Path, node_id: str) -> tuple[int, int, int]:
    """Fetch every manifest file that is missing or whose sha256 differs. -> (files, bytes, kept)."""
    out.mkdir(parents=True, exist_ok=True)
    fetched = nbytes = kept = 0
    total = sum(f.size for f in reply.files)
    for f in reply.files:
        path = out / f.name
        if path.is_file() and path.stat().st_size == f.size and sha256_file(path) == f.sha256:
            kept += 1
            continue
        if path.exists():
            say(f"{f.name}: corrupt or stale in the cache, fetching it again")
        tmp, h = path.with_suffix(".part"), hashlib.sha256()
        req = pb.ShardRequest(node_id=node_id, plan_digest=reply.plan_digest, rank=reply.rank, name=f.name,
                              ticket=reply.ticket)
        with open(tmp, "wb") as fh:
            async for chunk in link.stub.FetchShard(req):
                if chunk.offset != fh.tell():
                    raise FrameError(f"{f.name}: chunk at offset {chunk.offset}, expected {fh.tell()}")
                fh.write(chunk.data)
                h.update(chunk.data)
                nbytes += len(chunk.data)
        if h.hexdigest() != f.sha256 or tmp.stat().st_size != f.size:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{f.name} from the master does not match its sha256; the master's cache is corrupt")
        os.replace(tmp, path)
        fetched += 1
        say(f"fetched {f.name} ({f.size / 2**20:.1f} MiB; {nbytes / 2**20:.1f} of at most {total / 2**20:.1f} MiB)")
    return fetched, nbytes, kept


def run_worker(master: str, node_id: str, capacity: NodeCapacity, *, token: str | None = None,
               window: int | None = None, device: str = "cpu", address: str = "",
               expect_model: str = "", tls=None) -> int:
    try:
        link = SpokeLink(master, timeout_s=30.0, tls=tls)
    except PeerLost as e:
        raise UserError(str(e)) from None
    cap = pb.Capacity(memory_bytes=capacity.memory_bytes, cores=capacity.cores, disk_bytes=capacity.disk_bytes)
    if capacity.speed is not None:
        cap.speed = capacity.speed
    request = pb.JoinRequest(version=__version__, node_id=node_id, capacity=cap, address=address,
                             model_digest=expect_model)
    try:
        while True:              # the master re-plans (a node lost or admitted): join again
            code = _join_and_serve(link, master, request, token, capacity, window, device)
            if code is not REJOIN:
                return code
            link.close_session()
    finally:
        link.close()


REJOIN = object()


def _join_and_serve(link: SpokeLink, master: str, request: pb.JoinRequest, token: str | None,
                    capacity: NodeCapacity, window: int | None, device: str):
    node_id = request.node_id
    say(f"joining {master} as {node_id}")
    try:
        reply = link.run(_join(link, request, token))
    except grpc.aio.AioRpcError as e:
        raise UserError(f"the master at {master} failed: {e.code().name}: {e.details()}") from None
    if not reply.accepted:
        raise UserError(f"the master at {master} refused this node: {reply.reason}")
    plan = PartitionPlan.from_json(reply.plan_json)
    share = plan.share_of(reply.rank)
    out = worker_dir(reply, plan)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(reply.model_config_json)
    cfg = ModelConfig.from_dir(out)
    say(f"rank {reply.rank} of {reply.world_size}: kv heads {share.kv_start}-{share.kv_end}, "
        f"ffn columns {share.ffn_start}-{share.ffn_end}")
    t0 = time.monotonic()
    files, nbytes, kept = link.run(_fetch(link, reply, out, node_id))
    say(f"shards: fetched {files} files, {nbytes} bytes; {kept} files already cached "
        f"({time.monotonic() - t0:.1f} s)")
    if window is None and capacity.memory_bytes:      # stream through a window when the share does not fit
        from tpi_node.weights.budget import DTYPE_BYTES, choose_window
        from tpi_node.weights.plan import PlanError
        try:
            window = choose_window(cfg, share, capacity.memory_bytes, DTYPE_BYTES.get(reply.shard_dtype, 4))
        except PlanError as e:
            raise UserError(str(e)) from None
    store = ShardStore(out, cfg, share, window=window, device=device)
    spoke = StarSpoke(link, reply.rank, reply.world_size, _WIRE_NAMES[reply.wire_dtype])
    coll = spoke
    if reply.collective_init:      # --collective gloo on the master: a gloo ring sums the partials
        from tpi_node.comm.torch_dist import GlooCollective

        init = reply.collective_init.replace("tcp://:", f"tcp://{master.rpartition(':')[0]}:")
        coll = GlooCollective(init, reply.rank, reply.world_size, _WIRE_NAMES[reply.wire_dtype], lazy=True)
        say(f"partial sums over a gloo ring ({init})")
    runner = NodeRunner(cfg, store, share, coll, DTYPES[reply.shard_dtype], device)
    link.open_session()
    link.run(link.send(pb.WorkerMsg(hello=pb.Hello(node_id=node_id, plan_digest=reply.plan_digest,
                                                   rank=reply.rank, ticket=reply.ticket))))
    say(f"ready; serving steps from {master}")
    try:
        return _serve(link, spoke, runner, cfg)
    finally:
        runner.close()


def _serve(link: SpokeLink, spoke: StarSpoke, runner: NodeRunner, cfg: ModelConfig) -> int:
    while True:
        try:
            msg = link.run(link.recv(HEARTBEAT_S))
        except PeerLost as e:
            raise UserError(str(e)) from None
        if msg is None:
            link.run(link.send(pb.WorkerMsg(heartbeat=pb.Heartbeat(time=time.time()))))
            continue
        kind = msg.WhichOneof("kind")
        if kind == "step":
            try:
                _step(spoke, runner, cfg, msg.step)
            except StepAborted as e:
                say(f"step {msg.step.step_id} aborted by the master: {e}")
            except (FrameError, ValueError) as e:
                text = f"malformed frame from the master: {e}"
                link.run(link.send(pb.WorkerMsg(error=pb.Error(message=text, step_id=msg.step.step_id))))
                raise UserError(text) from None
            except PeerLost as e:
                raise UserError(str(e)) from None
        elif kind == "free":
            runner.free(list(msg.free.seq_ids))
        elif kind == "shutdown" and msg.shutdown.rejoin:
            say(msg.shutdown.reason)
            return REJOIN
        elif kind == "shutdown":
            say(f"the master ended the session: {msg.shutdown.reason}")
            return 1 if "malformed" in msg.shutdown.reason or "not" in msg.shutdown.reason else 0


def _step(spoke: StarSpoke, runner: NodeRunner, cfg: ModelConfig, step: pb.Step) -> None:
    layout = BatchLayout(tuple(step.layout.seq_ids), tuple(step.layout.past_lens), tuple(step.layout.new_lens))
    x = from_proto(step.hidden, (layout.num_tokens, cfg.hidden_size), what="step hidden states")
    spoke.begin_step(step.step_id)
    try:
        runner.forward(layout, x)                 # [T, H]; the master keeps the result
    except StepAborted:
        runner.free(list(layout.seq_ids))
        raise
