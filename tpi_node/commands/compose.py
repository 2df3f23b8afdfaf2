"""The composition root: the one place that turns settings into running parts - the device and
dtype, the collective each node computes with, the shard store (through the runner), the master
and its engine. Commands call these; nothing below this layer reads settings.

    engine = build_local_engine("smollm2-135m-instruct")                   # one node, in process
    master, engine, port = start_master(settings, nodes=3, grpc_port=0)   # the cluster's master

`make_master_collective` / `make_worker_collective` are where a collective is chosen (the star, a
gloo ring; the GPU fast path plugs in here).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from tpi_node.cluster.assignment import Assignment
from tpi_node.cluster.auth import resolve_token
from tpi_node.cluster.deployment import ClusterSpec, MakeCollective
from tpi_node.cluster.driver import ClusterDriver
from tpi_node.cluster.identity import claim
from tpi_node.cluster.identity import node_id as machine_node_id
from tpi_node.cluster.link import MasterLink
from tpi_node.cluster.master import ClusterMaster
from tpi_node.cluster.sessions import Sessions
from tpi_node.cluster.tls import TlsFiles, tls_files
from tpi_node.comm.collective import Collective, LocalCollective
from tpi_node.comm.star import StarHub, StarSpoke
from tpi_node.comm.torch_dist import GlooCollective
from tpi_node.dtypes import torch_dtype
from tpi_node.engine.budget import plan_memory
from tpi_node.engine.device import DeviceInfo, default_dtype, device_capacity, select_device
from tpi_node.engine.engine import Engine
from tpi_node.engine.head import ModelHead
from tpi_node.engine.limits import BLOCK_TOKENS, DEFAULT_LIMITS, EngineLimits
from tpi_node.engine.local import LocalDriver
from tpi_node.engine.runner import open_runner
from tpi_node.gpu.detect import detect_and_log
from tpi_node.model.config import ModelConfig
from tpi_node.model.tokenizer import Tokenizer
from tpi_node.settings import MasterSettings, TlsOptions
from tpi_node.weights.checkpoint import model_digest
from tpi_node.weights.plan import NodeCapacity, PartitionPlan, make_plan
from tpi_node.weights.prepare import resolve_model

log = logging.getLogger("tpi_node.compose")


def say(msg: str) -> None:
    print(f"[tpi-node] {msg}", file=sys.stderr, flush=True)


# ---- settings -> values --------------------------------------------------------------------------
def tls_for(s: TlsOptions, role: str, cert_name: str | None = None) -> TlsFiles | None:
    """TlsFiles from the TLS settings, or None (plaintext)."""
    return tls_files(role, s.tls_cert, s.tls_key, s.tls_ca, s.certs, cert_name)


def node_id_for(s, role: str) -> str:
    """--node-id, else this machine's id for the role (claimed: a second process of the same
    machine and home gets a derived one, and says so)."""
    return s.node_id or claim(machine_node_id(role=role))


def capacity_for(
    node_id: str, info: DeviceInfo, budget: int | None, dtype: str | None, speed: float | None
) -> NodeCapacity:
    """This node's capacity for the plan: memory of the device it computes on and its speed
    (measured unless given)."""
    cap = device_capacity(node_id, info, budget, dtype)
    return dataclasses.replace(cap, speed=speed) if speed else cap


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---- collectives ---------------------------------------------------------------------------------
def make_master_collective(spec: ClusterSpec) -> MakeCollective:
    """What rank 0 sums with, for each plan: one node alone needs no network; the star hub meets
    the workers' partials on their sessions; with --collective gloo a gloo ring sums instead (the
    sessions then only carry steps)."""

    def make(plan: PartitionPlan, sessions: Sessions) -> Collective:
        if plan.world_size == 1:
            return LocalCollective()
        if spec.collective_init:
            return GlooCollective(
                spec.collective_init.replace("tcp://:", "tcp://127.0.0.1:"),
                0,
                plan.world_size,
                spec.wire,
                timeout_s=max(30.0, spec.peer_timeout_s),
                lazy=True,
            )
        hub = StarHub(sessions.shared, plan.world_size, sessions, spec.wire, spec.peer_timeout_s)
        sessions.partials = hub
        return hub

    return make


def make_worker_collective(a: Assignment, link: MasterLink, master: str) -> Collective:
    """A worker's collective for its assignment: the star spoke on its session, or the gloo ring
    the master named (reached at the address the worker dials the master by)."""
    if not a.collective_init:
        return StarSpoke(link, a.rank, a.world_size, a.wire)
    init = a.collective_init.replace("tcp://:", f"tcp://{master.rpartition(':')[0]}:")
    say(f"partial sums over a gloo ring ({init})")
    return GlooCollective(init, a.rank, a.world_size, a.wire, lazy=True)


# ---- engines ---------------------------------------------------------------------------------------
def build_local_engine(
    model: str | Path,
    dtype: str = "fp32",
    window: int | None = None,
    limits: EngineLimits | None = None,
    progress: bool = True,
    memory_budget: int | None = None,
    device: str = "cpu",
    *,
    kv_blocks: int | None = None,
    max_context: int | None = None,
    prefix_cache: bool = True,
    speculative: str = "auto",
) -> Engine:
    """A single-node engine over a model name (prepared on first use) or a model directory. Its
    memory splits as a cluster node's does (engine/budget.py); `window` forces the weight window."""
    model_dir = resolve_model(str(model), progress=progress)
    cfg = ModelConfig.from_dir(model_dir)
    info = select_device(device)
    cap = device_capacity("local", info, memory_budget, dtype)
    plan = make_plan(cfg, [cap], model_digest(model_dir))
    mem = plan_memory(
        cfg,
        plan.share_of(0),
        cap.memory_bytes,
        dtype,
        budgeted=cap.budgeted,
        is_master=True,
        context=max_context,
        kv_blocks=kv_blocks,
        limits=limits or DEFAULT_LIMITS,
    )
    window = mem.window if window is None else window
    runner = open_runner(
        model_dir, cfg, plan, 0, LocalCollective(), dtype, window, str(info.device), progress, kv_blocks=mem.kv_blocks
    )
    # the reorder for oneDNN holds two copies of the lm_head for a moment: not under a budget
    head = ModelHead(
        model_dir, cfg, torch_dtype(dtype), info.device, prepacked=memory_budget is None and window is None
    )
    name = Path(model).name if Path(str(model)).exists() else str(model)
    say_memory("local", window, mem.kv_blocks, progress)
    return Engine(
        cfg,
        head,
        Tokenizer.from_dir(model_dir),
        LocalDriver(runner),
        name,
        limits,
        prefix_cache=prefix_cache,
        max_context=max_context,
        speculative=speculative,
    )


def say_memory(who: str, window: int | None, kv_blocks: int, progress: bool = True) -> None:
    if progress:
        say(
            f"{who}: weights {'resident' if window is None else f'streamed through a window of {window} layers'}, "
            f"KV cache {kv_blocks} blocks ({kv_blocks * BLOCK_TOKENS} tokens)"
        )


@dataclass
class RunningMaster:
    master: ClusterMaster
    engine: Engine
    port: int  # the bound gRPC port
    gpu: str  # the GPU fast path's decision, with its reason

    def stop(self) -> None:
        self.engine.shutdown()
        self.master.stop()


def start_master(s: MasterSettings, nodes: int, grpc_port: int) -> RunningMaster:
    """Open the model, start the gRPC server for `nodes` nodes (this one included)."""
    info = select_device(s.device)
    dtype = default_dtype(info, s.dtype)
    model_dir = resolve_model(s.model)
    cfg = ModelConfig.from_dir(model_dir)
    me = node_id_for(s, "master")
    cap = capacity_for(me, info, s.memory_budget, dtype, s.speed)
    # workers reach a gloo group's port at the address they dial the master by (empty host)
    gloo = f"tcp://:{_free_port()}" if s.collective == "gloo" else ""
    spec = ClusterSpec(
        model_dir,
        cfg,
        model_digest(model_dir),
        dtype,
        s.wire,
        str(info.device),
        s.peer_timeout,
        gloo,
        max_context=s.max_context,
        kv_blocks=s.kv_blocks,
    )
    master = ClusterMaster(
        spec,
        cap,
        make_master_collective(spec),
        nodes=nodes,
        token=resolve_token(s.token),
        tls=tls_for(s, "master"),
        auto_admit=s.auto_admit,
    )
    gpu = detect_and_log().summary()
    host = s.grpc_host or s.host
    port = master.start(f"{host}:{grpc_port}")
    say(f"master {cap.node_id}: workers join at {host}:{port} (waiting for {nodes - 1} more node(s))")
    head = ModelHead(model_dir, cfg, torch_dtype(dtype), info.device, prepacked=not s.memory_budget)
    engine = Engine(
        cfg,
        head,
        Tokenizer.from_dir(model_dir),
        ClusterDriver(master.coordinator),
        Path(s.model).name,
        prefix_cache=not s.no_prefix_cache,
        max_context=s.max_context,
        speculative=s.speculative,
    )
    return RunningMaster(master, engine, port, gpu)
