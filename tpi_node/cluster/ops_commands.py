"""Operator subcommands: `tpi-node status`, `tpi-node token`, `tpi-node certs`."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tpi_node.errors import UserError


def add_commands(sub) -> None:
    p = sub.add_parser("status", help="print the cluster table of a running master")
    p.add_argument("--master", metavar="URL", help="the master's HTTP address (default: found by mDNS, "
                   "else http://127.0.0.1:8000)")
    p.add_argument("--cluster", default="default", help="cluster name to look for by mDNS (default: default)")
    p.add_argument("--json", action="store_true", help="print the raw JSON state")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("token", help="make a new cluster token (give it to every node: --token or TPI_CLUSTER_TOKEN)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("certs", help="create a cluster CA and node certificates for mutual TLS")
    p.add_argument("--out", default=None, help="folder for the files (default: $TPI_HOME/certs)")
    p.add_argument("--worker", action="append", default=None, metavar="NAME",
                   help="a worker certificate to make (repeatable; default: one named 'worker')")
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="extra DNS name or IP to put in the certificates (repeatable)")
    p.add_argument("--cluster", default="default", help="cluster name written into the CA")
    p.set_defaults(func=cmd_certs)


# ---------------------------------------------------------------- token / certs

def cmd_token(args) -> int:
    from tpi_node.cluster.auth import new_token
    print(new_token())
    print("give every node of the cluster this token: --token TOKEN or TPI_CLUSTER_TOKEN=TOKEN",
          file=sys.stderr)
    return 0


def cmd_certs(args) -> int:
    from tpi_node.cluster.identity import tpi_home
    from tpi_node.cluster.tls import make_cluster_certs

    out = Path(args.out).expanduser() if args.out else tpi_home() / "certs"
    made = make_cluster_certs(out, tuple(args.worker or ["worker"]), tuple(args.host), args.cluster)
    for f in made:
        print(f)
    print(f"copy ca.crt and a node's .crt/.key to each node; serve/join with --certs DIR or "
          f"--tls-cert/--tls-key/--tls-ca. Keep {out / 'ca.key'} off the nodes.", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- status

def fetch_state(url: str, timeout: float = 5.0) -> dict:
    base = url if "://" in url else f"http://{url}"
    base = base.rstrip("/")
    last = None
    for path in ("/cluster.json", "/health"):
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as r:
                return json.loads(r.read(1 << 22))
        except urllib.error.HTTPError as e:
            if e.code == 503 and path == "/health":
                raise UserError(f"the master at {base} is up but the cluster is not ready (503)") from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(getattr(e, "reason", e))
            break
    raise UserError(f"cannot read the cluster state from {base}: {last}")


def _master_url(args) -> str:
    if args.master:
        return args.master
    from tpi_node.cluster.discovery import DiscoveryError, find_master
    try:
        m = find_master(args.cluster, timeout=2.0)
        return f"http://{m.address}:{m.http_port or 8000}"
    except DiscoveryError:
        return "http://127.0.0.1:8000"


def _range(r) -> str:
    if not isinstance(r, (list, tuple)) or len(r) != 2:
        return "-"
    return f"{r[0]}-{r[1] - 1}" if r[1] > r[0] else "none"


def _bytes(n) -> str:
    if n is None:
        return "all"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_table(state: dict) -> str:
    cols = ["NODE", "ROLE", "ADDRESS", "KV HEADS", "FFN COLS", "MEMORY", "WINDOW", "STATE", "HEARTBEAT", "TOK/S"]
    rows = []
    for n in state.get("nodes", []):
        hb = n.get("last_heartbeat_s")
        tps = n.get("tokens_per_s")
        rows.append([str(n.get("id", "?")), str(n.get("role") or ("master" if n.get("rank") == 0 else "worker")),
                     str(n.get("address") or "-"), _range(n.get("kv")), _range(n.get("ffn")),
                     _bytes(n.get("memory_budget")),
                     "resident" if n.get("window") is None else f"{n['window']} layers",
                     str(n.get("state", "-")), "-" if hb is None else f"{hb:.1f}s ago",
                     "-" if tps is None else f"{tps:.1f}"])
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    plan = state.get("plan") or {}
    t = state.get("throughput") or {}
    head = (f"cluster {state.get('cluster', 'default')}  model {state.get('model', '?')}  "
            f"{'ready' if state.get('ready', state.get('status') == 'ok') else 'NOT READY'}  "
            f"plan {str(plan.get('digest', '-'))[:16]}  "
            f"{t.get('tokens_per_s', 0) or 0:.1f} tok/s  running {t.get('running', '-')}  waiting {t.get('waiting', '-')}")
    tail = [state["gpu"]] if state.get("gpu") else []
    return "\n".join([head, line(cols)] + [line(r) for r in rows] + tail)


def cmd_status(args) -> int:
    state = fetch_state(_master_url(args))
    print(json.dumps(state, indent=1) if args.json else format_table(state))
    return 0
