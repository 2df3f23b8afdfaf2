"""The worker daemon (`tpi-node join`): Join the master, make sure its shard files are in the
local cache (sha256-checked; only missing or corrupt files are fetched), open them, then run the
layer loop for every Step the master sends, meeting the master in the collective.

Everything runs on one thread: the gRPC loop is run by this thread whenever it waits (for the
next frame, or for a sum inside a step), so a frame reaches the code with no thread hand-off.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from tpi_node import __version__
from tpi_node.cluster.assignment import Assignment
from tpi_node.cluster.auth import AuthError
from tpi_node.cluster.join_auth import prove_join_async
from tpi_node.cluster.link import MasterLink
from tpi_node.cluster.sessions import HEARTBEAT_S
from tpi_node.cluster.tls import TlsFiles
from tpi_node.comm.codec import FrameError, from_pb
from tpi_node.comm.collective import Collective
from tpi_node.comm.star import PeerLost, StepAborted
from tpi_node.dtypes import torch_dtype
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.runner import NodeRunner
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.weights.plan import NodeCapacity
from tpi_node.weights.slicer import sha256_file, shard_dir
from tpi_node.weights.store import ShardStore

# The collective this worker computes with for an assignment (chosen by commands/compose.py).
MakeWorkerCollective = Callable[[Assignment, MasterLink, str], Collective]

# What a worker does when the master ends its session, by ShutdownCode.
EXIT_CODES = {pb.MASTER_STOPPING: 0, pb.REFUSED: 1, pb.MALFORMED_FRAME: 1, pb.SHUTDOWN_UNSPECIFIED: 1}


def say(msg: str) -> None:
    print(f"[tpi-node] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class WorkerSpec:
    """Who this worker is and what it offers."""

    master: str  # host:port
    node_id: str
    capacity: NodeCapacity
    device: str = "cpu"
    token: str | None = None
    tls: TlsFiles | None = None
    address: str = ""  # how it describes itself (shown in /health)
    expect_model: str = ""


def worker_dir(a: Assignment) -> Path:
    """This worker's shard cache: named by model and plan digest (next to where a master on the
    same machine keeps the rank's source files, never the same folder)."""
    return shard_dir(a.model_digest, a.plan, a.rank, a.shard_dtype, a.shard_quant).with_name(f"rank-{a.rank}-worker")


def run_worker(spec: WorkerSpec, make_collective: MakeWorkerCollective) -> int:
    try:
        link = MasterLink(spec.master, timeout_s=30.0, tls=spec.tls)
    except PeerLost as e:
        raise UserError(str(e)) from None
    request = pb.JoinRequest(
        version=__version__,
        node_id=spec.node_id,
        capacity=spec.capacity.to_pb(),
        address=spec.address,
        model_digest=spec.expect_model,
    )
    try:
        while True:  # the master re-plans (a node lost or admitted): join again
            code = _join_and_serve(link, spec, request, make_collective)
            if code is not REJOIN:
                return code
            link.close_session()
    finally:
        link.close()


REJOIN = object()


async def _join(link: MasterLink, request: pb.JoinRequest, token: str | None) -> pb.JoinReply:
    try:
        await prove_join_async(link.stub, token, request)
    except AuthError as e:
        raise UserError(f"cannot join the master at {link.address}: {e}") from None
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    return await link.stub.Join(request)  # waits until the master has formed the plan


def _join_and_serve(link: MasterLink, spec: WorkerSpec, request: pb.JoinRequest, make_collective: MakeWorkerCollective):
    say(f"joining {spec.master} as {spec.node_id}")
    try:
        reply = link.run(_join(link, request, spec.token))
    except grpc.aio.AioRpcError as e:
        raise UserError(f"the master at {spec.master} failed: {e.code().name}: {e.details()}") from None
    if not reply.accepted:
        raise UserError(f"the master at {spec.master} refused this node: {reply.reason}")
    try:
        a = Assignment.from_pb(reply)
    except FrameError as e:
        raise UserError(str(e)) from None
    share = a.share
    out = worker_dir(a)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(a.model_config_json)
    cfg = ModelConfig.from_dir(out)
    say(
        f"rank {a.rank} of {a.world_size}: kv heads {share.kv_start}-{share.kv_end}, "
        f"ffn columns {share.ffn_start}-{share.ffn_end}"
    )
    t0 = time.monotonic()
    files, nbytes, kept = link.run(_fetch(link, a, out, spec.node_id))
    say(f"shards: fetched {files} files, {nbytes} bytes; {kept} files already cached ({time.monotonic() - t0:.1f} s)")
    # the master split this node's memory from the capacity it reported (engine/budget.py)
    store = ShardStore(out, cfg, share, window=a.window, device=spec.device)
    coll = make_collective(a, link, spec.master)
    runner = NodeRunner(cfg, store, share, coll, torch_dtype(a.shard_dtype), spec.device, a.kv_blocks)
    say(
        f"memory: {'resident' if a.window is None else f'window {a.window} layers'}, KV cache {a.kv_blocks} "
        f"blocks ({runner.kv.nbytes() / 2**20:.0f} MiB)"
    )
    link.open_session(pb.Hello(node_id=spec.node_id, plan_digest=a.plan.digest, rank=a.rank, ticket=a.ticket))
    say(f"ready; serving steps from {spec.master}")
    try:
        return _serve(link, runner, cfg)
    finally:
        runner.close()


async def _fetch(link: MasterLink, a: Assignment, out: Path, node_id: str) -> tuple[int, int, int]:
    """Fetch every manifest file that is missing or whose sha256 differs. -> (files, bytes, kept)."""
    out.mkdir(parents=True, exist_ok=True)
    fetched = nbytes = kept = 0
    total = sum(f.size for f in a.files)
    for f in a.files:
        path = out / f.name
        if path.is_file() and path.stat().st_size == f.size and sha256_file(path) == f.sha256:
            kept += 1
            continue
        if path.exists():
            say(f"{f.name}: corrupt or stale in the cache, fetching it again")
        tmp, h = path.with_suffix(".part"), hashlib.sha256()
        req = pb.ShardRequest(node_id=node_id, plan_digest=a.plan.digest, rank=a.rank, name=f.name, ticket=a.ticket)
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


def _serve(link: MasterLink, runner: NodeRunner, cfg: ModelConfig):
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
                _step(runner, cfg, msg.step)
            except StepAborted as e:
                say(f"step {msg.step.step_id} aborted by the master: {e}")
            except (FrameError, ValueError) as e:
                text = f"malformed frame from the master: {e}"
                link.run(link.send(pb.WorkerMsg(error=pb.Error(message=text, step_id=msg.step.step_id))))
                raise UserError(text) from None
            except PeerLost as e:
                raise UserError(str(e)) from None
        elif kind == "shutdown" and msg.shutdown.code == pb.REJOIN:
            say(msg.shutdown.reason)
            return REJOIN
        elif kind == "shutdown":
            say(f"the master ended the session: {msg.shutdown.reason}")
            return EXIT_CODES.get(msg.shutdown.code, 1)


def _step(runner: NodeRunner, cfg: ModelConfig, step: pb.Step) -> None:
    layout = BatchLayout.from_pb(step.layout)
    x = from_pb(step.hidden, (layout.num_tokens, cfg.hidden_size), what="step hidden states")
    runner.forward(layout, x, step.step_id)  # [T, H]; the master keeps the result
