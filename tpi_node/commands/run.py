"""`tpi-node run --nodes N`: a master plus N-1 local workers (each a `tpi-node join` process)."""

from __future__ import annotations

import os

from tpi_node.commands.compose import local_gpus_for, say, start_master
from tpi_node.commands.local_cluster import (
    share_cores_with_local_workers,
    spawn_workers,
    stop_children,
    worker_env,
    worker_flags,
)
from tpi_node.commands.serve import check_master_settings, serve_http
from tpi_node.settings import DEFAULT_RUN_NODES, RunSettings


def default_nodes(cores: int | None = None) -> int:
    """Local nodes share this machine's cores: no more nodes than cores (a node waiting for a core
    makes every allreduce wait), but a cluster all the same."""
    return max(2, min(DEFAULT_RUN_NODES, cores or os.cpu_count() or 1))


def run(s: RunSettings) -> int:
    check_master_settings(s)
    nodes = s.nodes or default_nodes()
    if not s.nodes:
        say(f"run: {nodes} local nodes, one per core of this machine at most (--nodes N to choose)")
    share_cores_with_local_workers(nodes)
    gpus = local_gpus_for(s, nodes)  # one GPU per node where they form an NVLink group
    running = start_master(s, nodes, s.grpc_port or 0, gpus)
    host = s.grpc_host or s.host
    children = spawn_workers(
        f"{host}:{running.port}",
        nodes - 1,
        running.master.membership.master_id,
        worker_flags(s),
        worker_env(s),
        tuple(f"cuda:{g}" for g in gpus[1:]),
    )
    try:
        serve_http(s, running)
    finally:
        running.stop()
        stop_children(children)
    return 0
