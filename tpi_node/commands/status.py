"""`tpi-node status`: the cluster table of a running master (its /cluster.json), or what its gRPC
Status RPC tells (`--master grpc://HOST[:PORT]`, with the cluster token when it has one)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tpi_node.cluster.auth import resolve_token
from tpi_node.cluster.discovery import DiscoveryError, find_master
from tpi_node.cluster.status_rpc import read_status
from tpi_node.commands.compose import tls_for
from tpi_node.commands.join import master_address
from tpi_node.errors import UserError
from tpi_node.settings import StatusSettings


def fetch_state(url: str, timeout: float = 5.0, api_key: str | None = None) -> dict:
    base = url if "://" in url else f"http://{url}"
    base = base.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = None
    for path in ("/cluster.json", "/health"):
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=timeout) as r:
                return json.loads(r.read(1 << 22))
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise UserError(
                    f"the master at {base} needs its API key: give --api-key or TPI_API_KEY"
                    + (" (the one given is wrong)" if api_key else "")
                ) from None
            if e.code == 503 and path == "/health":
                raise UserError(f"the master at {base} is up but the cluster is not ready (503)") from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = str(getattr(e, "reason", e))
            break
    raise UserError(f"cannot read the cluster state from {base}: {last}")


def _master_url(s: StatusSettings) -> str:
    if s.status_master:
        return s.status_master
    try:
        m = find_master(s.cluster, timeout=2.0)
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
        rows.append(
            [
                str(n.get("id", "?")),
                str(n.get("role") or ("master" if n.get("rank") == 0 else "worker")),
                str(n.get("address") or "-"),
                _range(n.get("kv")),
                _range(n.get("ffn")),
                _bytes(n.get("memory_budget")) if "memory_budget" in n else "-",
                "-" if "window" not in n else "resident" if n["window"] is None else f"{n['window']} layers",
                str(n.get("state", "-")),
                "-" if hb is None else f"{hb:.1f}s ago",
                "-" if tps is None else f"{tps:.1f}",
            ]
        )
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    plan = state.get("plan") or {}
    t = state.get("throughput") or {}
    head = (
        f"cluster {state.get('cluster', 'default')}  model {state.get('model', '?')}  "
        f"{'ready' if state.get('ready', state.get('status') == 'ok') else 'NOT READY'}  "
        f"plan {str(plan.get('digest', '-'))[:16]}  "
        f"{t.get('tokens_per_s', 0) or 0:.1f} tok/s  running {t.get('running', '-')}  waiting {t.get('waiting', '-')}"
    )
    tail = [state["gpu"]] if state.get("gpu") else []
    return "\n".join([head, line(cols)] + [line(r) for r in rows] + tail)


def run(s: StatusSettings) -> int:
    url = _master_url(s)
    if url.startswith("grpc://"):
        state = read_status(master_address(url.removeprefix("grpc://")), resolve_token(s.token), tls_for(s, "worker"))
        state["cluster"] = s.cluster
    else:
        state = fetch_state(url, api_key=s.api_key)
    print(json.dumps(state, indent=1) if s.json else format_table(state))
    return 0
