"""The discovery and security flags of `serve`, `run` and `join`, and what they turn into:
TLS files, the master's address found by mDNS, this node's mDNS advertisement."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from tpi_node import __version__

log = logging.getLogger("tpi_node.cluster")


def add_tls_flags(p: argparse.ArgumentParser, worker: bool) -> None:
    p.add_argument("--certs", default=None, metavar="DIR",
                   help="mutual TLS from a `tpi-node certs` folder (ca.crt + " +
                        ("worker.crt/.key, or --cert-name" if worker else "master.crt/.key") + ")")
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="this node's certificate (PEM)")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="this node's private key (PEM)")
    p.add_argument("--tls-ca", default=None, metavar="FILE", help="the cluster CA certificate (PEM)")
    if worker:
        p.add_argument("--cert-name", default=None, metavar="NAME",
                       help="use NAME.crt/NAME.key from --certs (default: worker)")


def add_discovery_flags(p: argparse.ArgumentParser, worker: bool) -> None:
    p.add_argument("--cluster", default="default", metavar="NAME",
                   help="cluster name on the local network (mDNS); default: default")
    if worker:
        p.add_argument("--discover-timeout", type=float, default=5.0, metavar="S",
                       help="seconds to look for the master by mDNS when --master is not given (default 5)")
    else:
        p.add_argument("--auto-admit", action="store_true",
                       help="admit new workers of this cluster at the next idle moment (re-planning)")


def tls_from_args(args, role: str):
    """TlsFiles from the flags, or None (plaintext)."""
    from tpi_node.cluster.tls import tls_files
    return tls_files(role, getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                     getattr(args, "tls_ca", None), getattr(args, "certs", None), getattr(args, "cert_name", None))


def find_master_address(args) -> str:
    """--master, else the master of --cluster found by mDNS ("host:port")."""
    if args.master:
        return args.master
    from tpi_node.cluster.discovery import find_master
    print(f"[tpi-node] looking for the master of cluster '{args.cluster}' on the local network (mDNS)...",
          file=sys.stderr, flush=True)
    m = find_master(args.cluster, timeout=args.discover_timeout, version=__version__)
    print(f"[tpi-node] found {m.describe()}", file=sys.stderr, flush=True)
    return f"{m.address}:{m.port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost",)


def advertise_master(args, node_id: str, grpc_host: str, grpc_port: int, http_port: int):
    """Advertise the master by mDNS unless it only listens on loopback. -> Advertisement | None."""
    if _is_loopback(grpc_host):
        return None
    from tpi_node.cluster.discovery import advertise_master as adv
    addrs = None if grpc_host in ("0.0.0.0", "", "::") else [grpc_host]
    try:
        return adv(args.cluster, node_id, __version__, grpc_port, http_port, addresses=addrs)
    except OSError as e:          # no multicast here: serving still works with --master
        log.warning("cannot advertise on the network (mDNS): %s", e)
        return None


def advertise_worker(args, node_id: str, capacity):
    """Advertise this worker (its capacity) for `serve --auto-admit` and `status`; None on failure."""
    from tpi_node.cluster.discovery import advertise_worker as adv
    try:
        return adv(args.cluster, node_id, __version__, capacity.memory_bytes, capacity.cores, capacity.disk_bytes)
    except OSError as e:
        log.warning("cannot advertise on the network (mDNS): %s", e)
        return None
