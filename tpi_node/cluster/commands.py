"""Cluster subcommands: `serve` (the master, also a node holding a slice), `join` (a worker),
`run` (a master plus N-1 local `tpi-node join` child processes), and the local cluster behind
`generate --nodes N`. Every flag can also come from TPI_* variables or a YAML --config file."""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tpi_node.config import add_config_flag, merge_settings
from tpi_node.errors import UserError

DEFAULT_GRPC_PORT = 50051


def _positive_int(s):
    from tpi_node.cli import positive_int
    return positive_int(s)


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a port number") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {v}")
    return v


def _seconds(s: str) -> float:
    from tpi_node.cli import non_negative_float
    return non_negative_float(s)


def _master_flags(p: argparse.ArgumentParser) -> None:
    from tpi_node.commands_model import add_model_flags
    from tpi_node.engine.device import add_device_flag

    add_model_flags(p)
    add_device_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="HTTP port of the OpenAI API and /health (default 8000)")
    p.add_argument("--grpc-host", default=None, help="address workers dial (default: --host)")
    p.add_argument("--wire", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the partial sums on the wire (default fp32)")
    p.add_argument("--collective", choices=["star", "gloo"], default="star",
                   help="what sums the partial sums: the gRPC star through the master (default), or a "
                        "torch.distributed gloo ring (every node must reach the master's gloo port; "
                        "no re-plan after a lost node)")
    p.add_argument("--peer-timeout", type=_seconds, default=5.0,
                   help="seconds without a partial sum before a worker counts as lost (default 5)")
    p.add_argument("--token", default=None, help="cluster token (else TPI_CLUSTER_TOKEN; none = open cluster)")
    p.add_argument("--node-id", default=None, help="this node's id (default: a stable id of this machine)")
    p.add_argument("--api-key", default=None, help="require this bearer token on the OpenAI API")
    p.add_argument("--speed", type=_seconds, default=None, help="this node's relative speed for the plan (default: measured)")
    from tpi_node.cluster.cluster_flags import add_discovery_flags, add_tls_flags
    add_discovery_flags(p, worker=False)
    add_tls_flags(p, worker=False)
    add_config_flag(p)


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="run the master: the OpenAI API, and the gRPC port workers join")
    _master_flags(p)
    p.add_argument("--grpc-port", type=_port, default=DEFAULT_GRPC_PORT,
                   help=f"gRPC port workers dial (default {DEFAULT_GRPC_PORT})")
    p.add_argument("--min-nodes", type=_positive_int, default=1,
                   help="nodes (this one included) to wait for before planning the split (default 1)")
    p.set_defaults(func=cmd_serve, _parser=p)

    p = sub.add_parser("join", help="join a master as a worker and serve its slice of the model")
    p.add_argument("--master", required=False, default=None, metavar="HOST[:PORT]",
                   help=f"the master's gRPC address (port default {DEFAULT_GRPC_PORT}; "
                        "default: found on the local network by mDNS)")
    p.add_argument("--node-id", default=None, help="this node's id (default: a stable id of this machine)")
    p.add_argument("--token", default=None, help="cluster token (else TPI_CLUSTER_TOKEN)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help="memory this node offers (e.g. 4GiB)")
    p.add_argument("--speed", type=_seconds, default=None, help="this node's relative speed for the plan (default: measured)")
    p.add_argument("--expect-model", default="", metavar="DIGEST", help="refuse a master serving another model")
    from tpi_node.engine.device import add_device_flag
    add_device_flag(p)
    from tpi_node.cluster.cluster_flags import add_discovery_flags, add_tls_flags
    add_discovery_flags(p, worker=True)
    add_tls_flags(p, worker=True)
    add_config_flag(p)
    p.set_defaults(func=cmd_join, _parser=p)

    p = sub.add_parser("run", help="a master plus N-1 local workers (each a `tpi-node join` process)")
    _master_flags(p)
    p.add_argument("--nodes", type=_positive_int, default=3, help="cluster size, master included (default 3)")
    p.add_argument("--grpc-port", type=_port, default=0, help="gRPC port (default: any free one)")
    p.set_defaults(func=cmd_run, _parser=p)


def _settings(args) -> argparse.Namespace:
    return merge_settings(args, args._parser)


def _node_id(args, role: str) -> str:
    if args.node_id:
        return args.node_id
    from tpi_node.cluster.identity import node_id
    return node_id(role=role)


def _token(args) -> str | None:
    from tpi_node.cluster.auth import resolve_token
    return resolve_token(args.token)


def parse_master_address(s: str | None) -> str:
    if not s:
        raise UserError("give the master's address: tpi-node join --master HOST[:PORT]")
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        return f"{s}:{DEFAULT_GRPC_PORT}"
    return s


# ---- the master ------------------------------------------------------------------------------
def start_master(args, nodes: int, grpc_port: int):
    """Open the model, start the gRPC server; -> (master, engine, bound gRPC port)."""
    from tpi_node.cluster.master import ClusterDriver, ClusterMaster
    from tpi_node.engine.device import default_dtype, device_from_args
    from tpi_node.engine.engine import Engine
    from tpi_node.engine.head import ModelHead
    from tpi_node.engine.node import local_capacity
    from tpi_node.model.config import ModelConfig
    from tpi_node.model.tokenizer import Tokenizer
    from tpi_node.weights.prepare import resolve_model
    from tpi_node.weights.slicer import DTYPES

    info = device_from_args(args)
    dtype = default_dtype(info, args.dtype)
    model_dir = resolve_model(str(args.model))
    cfg = ModelConfig.from_dir(model_dir)
    from tpi_node.cluster.cluster_flags import tls_from_args
    from tpi_node.weights.budget import parse_size
    budget = parse_size(args.memory_budget) if getattr(args, "memory_budget", None) else None
    cap = local_capacity(_node_id(args, "master"), budget, device=str(info.device), dtype=dtype)
    if getattr(args, "speed", None):
        cap = dataclasses.replace(cap, speed=args.speed)
    master = ClusterMaster(model_dir, cfg, cap, nodes=nodes, dtype=dtype, wire=args.wire,
                           device=str(info.device), token=_token(args), peer_timeout_s=args.peer_timeout,
                           tls=tls_from_args(args, "master"), auto_admit=getattr(args, "auto_admit", False),
                           collective=getattr(args, "collective", "star"))
    from tpi_node.gpu.detect import detect_and_log
    master.gpu_decision = detect_and_log().summary()      # the GPU fast path's decision, with its reason
    port = master.start(f"{args.grpc_host or args.host}:{grpc_port}")
    print(f"[tpi-node] master {cap.node_id}: workers join at {args.grpc_host or args.host}:{port} "
          f"(waiting for {nodes - 1} more node(s))", file=sys.stderr, flush=True)
    head = ModelHead(model_dir, cfg, DTYPES[dtype], info.device, prepacked=not getattr(args, "memory_budget", None))
    name = Path(str(args.model)).name
    engine = Engine(cfg, head, Tokenizer.from_dir(model_dir), ClusterDriver(master), name)
    return master, engine, port


def _say_when_ready(args, master, engine) -> None:
    """Once the cluster is ready: where it serves, and a line to try it with."""
    while not master.ready():
        if master.stopped:
            return
        time.sleep(0.2)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}"
    key = ' -H "Authorization: Bearer $TPI_API_KEY"' if args.api_key else ""
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "What is the capital of France?"}], '
            '"max_tokens": 30}' % engine.model_name)
    print(f"[tpi-node] ready: {master.plan.world_size} node(s) serving {engine.model_name} on {url} "
          f"(dashboard {url}/)\n[tpi-node] try: curl -s {url}/v1/chat/completions -H "
          f"\"Content-Type: application/json\"{key} -d '{body}'", file=sys.stderr, flush=True)


def _serve_http(args, master, engine) -> None:
    import uvicorn

    from tpi_node.server.app import create_app
    from tpi_node.cluster.cluster_flags import advertise_master
    from tpi_node.cluster.state import ClusterState
    from tpi_node.server.dashboard import dashboard_router
    app = create_app(engine, engine.tokenizer, model_name=engine.model_name, api_key=args.api_key,
                     cluster_info=master.cluster_info)
    ad = advertise_master(args, master.members[0][0].node_id, args.grpc_host or args.host, master.bound_port,
                          args.port) if hasattr(args, "cluster") else None
    watch = None
    if ad is not None and getattr(args, "auto_admit", False):
        from tpi_node.cluster.discovery import WorkerWatch
        watch = WorkerWatch(args.cluster)
    app.include_router(dashboard_router(ClusterState(master, engine, getattr(args, "cluster", "default"), watch)))
    threading.Thread(target=_say_when_ready, args=(args, master, engine), daemon=True).start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for x in (watch, ad):
            if x is not None:
                x.close()


def cmd_serve(args) -> int:
    args = _settings(args)
    master, engine, _ = start_master(args, args.min_nodes, args.grpc_port)
    try:
        _serve_http(args, master, engine)
    finally:
        engine.shutdown()
        master.stop()
    return 0


def spawn_workers(address: str, n: int, base_id: str, extra: list[str] | None = None) -> list[subprocess.Popen]:
    """n `tpi-node join` child processes (ps shows what they are)."""
    exe = Path(sys.executable).with_name("tpi-node")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tpi_node.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(share_cores(n + 1))}
    return [subprocess.Popen(cmd + ["join", "--master", address, "--node-id", f"{base_id}-w{i}"] + (extra or []),
                             env=env)
            for i in range(1, n + 1)]


def share_cores(processes: int) -> int:
    """Threads per process when `processes` nodes share this machine: oversubscribed cores make
    every node wait for the slowest at each allreduce."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def _share_cores_with_local_workers(nodes: int) -> None:
    if nodes > 1 and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(share_cores(nodes))


def _stop_children(children: list[subprocess.Popen]) -> None:
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in children:
        try:
            c.wait(timeout=5)
        except subprocess.TimeoutExpired:
            c.kill()


def _wait_ready(master, children, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not master.ready():
        if master.error:
            raise UserError(f"cannot form the cluster: {master.error}")
        dead = [c for c in children if c.poll() is not None]
        if dead:
            raise UserError(f"a local worker exited with code {dead[0].returncode} before the cluster was ready")
        if time.monotonic() > deadline:
            raise UserError(f"the cluster was not ready within {timeout_s:g} s")
        time.sleep(0.1)


def cmd_run(args) -> int:
    args = _settings(args)
    _share_cores_with_local_workers(args.nodes)
    master, engine, port = start_master(args, args.nodes, args.grpc_port)
    host = args.grpc_host or args.host
    children = spawn_workers(f"{host}:{port}", args.nodes - 1, master.members[0][0].node_id,
                             ["--token", args.token] if args.token else None)
    try:
        _serve_http(args, master, engine)
    finally:
        engine.shutdown()
        master.stop()
        _stop_children(children)
    return 0


def local_cluster_engine(model_dir, args):
    """`generate --nodes N`: master in this process, N-1 local workers; -> (engine, cleanup)."""
    ns = argparse.Namespace(model=str(model_dir), dtype=getattr(args, "dtype", None),
                            device=getattr(args, "device", "cpu"), host="127.0.0.1", grpc_host=None,
                            wire=getattr(args, "wire", "fp32"), peer_timeout=5.0, token=None, node_id="local",
                            speed=None)
    _share_cores_with_local_workers(args.nodes)
    master, engine, port = start_master(ns, args.nodes, 0)
    children = spawn_workers(f"127.0.0.1:{port}", args.nodes - 1, "local")
    try:
        _wait_ready(master, children)
    except BaseException:
        engine.shutdown()
        master.stop()
        _stop_children(children)
        raise

    def cleanup() -> None:
        engine.shutdown()
        master.stop()
        _stop_children(children)
    return engine, cleanup


# ---- the worker ------------------------------------------------------------------------------
def cmd_join(args) -> int:
    args = _settings(args)
    from tpi_node.cluster.worker import run_worker
    from tpi_node.engine.device import device_from_args
    from tpi_node.engine.node import local_capacity
    from tpi_node.weights.budget import parse_size

    info = device_from_args(args)
    budget = parse_size(args.memory_budget) if args.memory_budget else None
    node = _node_id(args, "worker")
    cap = local_capacity(node, budget, device=str(info.device))
    if args.speed:
        cap = dataclasses.replace(cap, speed=args.speed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from tpi_node.cluster.cluster_flags import advertise_worker, find_master_address, tls_from_args
    tls = tls_from_args(args, "worker")
    master = parse_master_address(find_master_address(args))
    ad = advertise_worker(args, node, cap) if not args.master else None    # on the segment discovery uses
    try:
        return run_worker(master, node, cap, token=_token(args), device=str(info.device),
                          expect_model=args.expect_model, address=os.uname().nodename, tls=tls)
    finally:
        if ad is not None:
            ad.close()
