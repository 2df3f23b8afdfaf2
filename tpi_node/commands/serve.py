"""`tpi-node serve`: the master - the OpenAI API over HTTP and the gRPC port workers join (it also
holds a slice of the model itself). `run` serves the same way with local workers."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time

from tpi_node import __version__
from tpi_node.cluster.discovery import WorkerWatch, advertise_master
from tpi_node.cluster.master import refuse_unauthenticated_ring
from tpi_node.cluster.view import ClusterView
from tpi_node.commands.compose import RunningMaster, parse_gpus, say, start_master, tls_for
from tpi_node.commands.local_cluster import spawn_workers, stop_children, worker_env, worker_flags
from tpi_node.server.app import api_key_check, create_app
from tpi_node.server.dashboard import dashboard_router
from tpi_node.settings import DEFAULT_GRPC_PORT, MasterSettings, ServeSettings

log = logging.getLogger("tpi_node.serve")
WAIT_SAY_S = 10.0  # a master that is not ready says what it waits for this often


def run(s: ServeSettings) -> int:
    check_master_settings(s)
    gpus = parse_gpus(s.gpus)  # --gpus: one node per GPU, this one on the first, the others children
    port = DEFAULT_GRPC_PORT if s.grpc_port is None else s.grpc_port
    running = start_master(s, max(s.min_nodes, len(gpus)), port, gpus)
    children = []
    if len(gpus) > 1:
        devices = tuple(f"cuda:{g}" for g in gpus[1:])
        address, me = f"{s.grpc_host or s.host}:{running.port}", running.master.membership.master_id
        children = spawn_workers(address, len(devices), me, worker_flags(s), worker_env(s), devices)
    try:
        serve_http(s, running)
    finally:
        running.stop()
        stop_children(children)
    return 0


def check_master_settings(s: MasterSettings) -> None:
    """What can be refused before the model is opened (which may mean preparing it first)."""
    refuse_unauthenticated_ring(s.collective == "gloo", s.token, tls_for(s, "master") is not None)


def serve_http(s: MasterSettings, running: RunningMaster) -> None:
    """The OpenAI API, /health, /metrics and the dashboard, until the process is stopped."""
    import uvicorn

    master, engine = running.master, running.engine
    app = create_app(
        engine,
        engine.tokenizer,
        model_name=engine.model_name,
        api_key=s.api_key,
        public_metrics=s.public_metrics,
        cluster_info=master.cluster_info,
    )
    ad = _advertise(s, master.membership.master_id, master.bound_port)
    watch = None
    if ad is not None and s.auto_admit:
        watch = WorkerWatch(s.cluster)
    view = ClusterView(master, engine, s.cluster, watch, running.gpu)
    app.include_router(dashboard_router(view, api_key_check(s.api_key)))
    threading.Thread(target=_say_when_ready, args=(s, running), daemon=True).start()
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level="warning")
    finally:
        for x in (watch, ad):
            if x is not None:
                x.close()


def _say_when_ready(s: MasterSettings, running: RunningMaster) -> None:
    """Until the cluster is ready, what it waits for (every WAIT_SAY_S); then where it serves, and
    a line to try it with."""
    master, engine = running.master, running.engine
    next_say = time.monotonic() + WAIT_SAY_S
    while not master.ready():
        if master.stopped:
            return
        if time.monotonic() >= next_say:
            say(f"{master.membership.waiting_for()}; workers join at port {master.bound_port}")
            next_say += WAIT_SAY_S
        time.sleep(0.2)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    url = f"http://{host}:{s.port}"
    key = ' -H "Authorization: Bearer $TPI_API_KEY"' if s.api_key else ""
    question = {"role": "user", "content": "What is the capital of France?"}
    body = json.dumps({"model": engine.model_name, "messages": [question], "max_tokens": 30})
    say(
        f"ready: {master.membership.plan.world_size} node(s) serving {engine.model_name} on {url} "
        f"(dashboard {url}/)\n[tpi-node] try: curl -s {url}/v1/chat/completions -H "
        f"\"Content-Type: application/json\"{key} -d '{body}'"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost",)


def _advertise(s: MasterSettings, node_id: str, grpc_port: int):
    """Advertise the master by mDNS unless it only listens on loopback. -> Advertisement | None."""
    grpc_host = s.grpc_host or s.host
    if _is_loopback(grpc_host):
        return None
    addrs = None if grpc_host in ("0.0.0.0", "", "::") else [grpc_host]
    try:
        return advertise_master(s.cluster, node_id, __version__, grpc_port, s.port, addresses=addrs)
    except OSError as e:  # no multicast here: serving still works with --master
        log.warning("cannot advertise on the network (mDNS): %s", e)
        return None
