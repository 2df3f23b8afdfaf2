"""`tpi-node join [--master HOST[:PORT]]`: join a master as a worker and serve its slice of the
model (the master is found by mDNS when --master is not given)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from tpi_node import __version__
from tpi_node.cluster.auth import resolve_token
from tpi_node.cluster.discovery import advertise_worker, find_master
from tpi_node.cluster.worker import WorkerSpec, run_worker
from tpi_node.commands.compose import capacity_for, make_worker_collective, node_id_for, say, tls_for
from tpi_node.engine.device import select_device
from tpi_node.settings import DEFAULT_GRPC_PORT, JoinSettings

log = logging.getLogger("tpi_node.join")


def run(s: JoinSettings) -> int:
    info = select_device(s.device)
    node = node_id_for(s, "worker")
    cap = capacity_for(node, info, s.memory_budget, None, s.speed)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tls = tls_for(s, "worker", s.cert_name)
    master = master_address(s.master or _find_master(s))
    ad = _advertise(s, node, cap) if not s.master else None  # on the segment discovery uses
    spec = WorkerSpec(
        master,
        node,
        cap,
        device=str(info.device),
        token=resolve_token(s.token),
        tls=tls,
        address=os.uname().nodename,
        expect_model=s.expect_model,
        cache_size=s.cache_size,
        master_retry_s=s.master_retry_s,
        dial_timeout_s=s.dial_timeout,
        local_session=s.local_session == "auto",
        # a master found by mDNS is found that way again should it be lost (it may come back elsewhere)
        rediscover=None if s.master else lambda: master_address(_find_master(s)),
    )
    try:
        return run_worker(spec, make_worker_collective)
    finally:
        if ad is not None:
            ad.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # exiting already (see _exit_on_sigterm)


def _exit_on_sigterm(*_) -> None:
    """SIGTERM ends the worker as its own exit does (code 0, cleanup run). Only once: a second
    SIGTERM while it exits (`run` stopping its workers, after the master told them to go) ends
    it at once, where SystemExit raised inside an interpreter exit hook would only be printed
    ("Exception ignored in atexit callback ... SystemExit: 0")."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(0)


def master_address(s: str) -> str:
    """HOST or HOST:PORT -> HOST:PORT (the default gRPC port when none is given)."""
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        return f"{s}:{DEFAULT_GRPC_PORT}"
    return s


def _find_master(s: JoinSettings) -> str:
    """The master of --cluster, found by mDNS ("host:port")."""
    say(f"looking for the master of cluster '{s.cluster}' on the local network (mDNS)...")
    m = find_master(s.cluster, timeout=s.discover_timeout, version=__version__)
    say(f"found {m.describe()}")
    return f"{m.address}:{m.port}"


def _advertise(s: JoinSettings, node_id: str, capacity):
    """Advertise this worker (its capacity) for `serve --auto-admit` and `status`; None on failure."""
    try:
        return advertise_worker(
            s.cluster, node_id, __version__, capacity.memory_bytes, capacity.cores, capacity.disk_bytes
        )
    except OSError as e:
        log.warning("cannot advertise on the network (mDNS): %s", e)
        return None
