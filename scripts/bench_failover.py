"""The failover pause: the time from `kill -9` of a worker to the cluster serving again.

A master (`tpi-node serve`) and N-1 workers (`tpi-node join`), each a real process with its own
TPI_HOME (its own shard cache, as if on its own machine), on loopback. Once the cluster is ready
and has answered one request, the last worker is killed and a one-token completion is sent at
once: it waits while the master re-plans over the survivors, they fetch their new slices and the
engine replays; the pause is kill -> that reply. The survivors' `shards: fetched ...` lines say
what crossed the wire.

    python scripts/bench_failover.py [--preset llama3.2-1b] [--layers 16] [--nodes 3] [--dtype fp32]

On an emulated LAN instead of loopback (root; node i runs in testbed node n<i>, docs/testbed.md):

    scripts/testbed --name tpifo run --preset gigabit-lan --nodes 3 -- \
        .venv/bin/python scripts/bench_failover.py --testbed tpifo

The synthetic checkpoint is written once into --work (default /tmp/tpi-bench-failover).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tpi_node.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, work: Path, argv: list[str], testbed=None, node: int = 0) -> tuple[subprocess.Popen, Path]:
    """A node's process (in testbed node n<node> when given: it execs into the namespace, so
    the process is tpi-node itself and a kill reaches it)."""
    home, log = work / f"home-{name}", work / f"{name}.log"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, "TPI_HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = CLI + argv
    if testbed is not None:
        cmd, env = testbed.command(f"n{node}", cmd), {**env, **testbed.env(f"n{node}")}
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    return proc, log


def wait_health(url: str, nodes: int, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a node exited before the cluster was ready")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200 and len(r.json()["nodes"]) == nodes:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"not ready within {timeout} s")


def complete(url: str, model: str) -> None:
    """One greedy token; retried while the cluster answers 503 (re-planning)."""
    while True:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": model, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0},
            timeout=1800,
        )
        if r.status_code == 200:
            return
        if r.status_code != 503:
            raise SystemExit(f"completion failed: {r.status_code} {r.text}")
        time.sleep(0.1)


PHASES = {  # the master's log line that ends each phase (after the kill)
    "replanned": r"(\d\d:\d\d:\d\d) WARNING .*re-planning",  # new shares sliced, survivors told
    "rejoined": r"(\d\d:\d\d:\d\d) INFO .*connected",  # (the last) survivor fetched and opened its slice
}


def phases(master_log: str, wall0: float) -> dict:
    """Seconds from the kill to the end of each phase (from the log's HH:MM:SS stamps: +-1 s)."""
    day = time.strftime("%Y-%m-%d ", time.localtime(wall0))
    out = {}
    for key, pattern in PHASES.items():
        stamps = [time.mktime(time.strptime(day + m, "%Y-%m-%d %H:%M:%S")) for m in re.findall(pattern, master_log)]
        later = [max(0, round(t - wall0)) for t in stamps if t >= int(wall0)]
        out[key] = (later[-1] if key == "rejoined" else later[0]) if later else None
    return out


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3.2-1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--work", default="/tmp/tpi-bench-failover")
    ap.add_argument("--testbed", default="", help="the name of a running testbed to put node i in n<i>")
    a = ap.parse_args()
    work = Path(a.work)
    model = work / f"model-{a.preset}-{a.layers or 'all'}"
    if not (model / "config.json").is_file():
        subprocess.run(
            CLI
            + ["synth", "--preset", a.preset, "--out", str(model)]
            + (["--layers", str(a.layers)] if a.layers else []),
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    http, grpc_port = free_port(), free_port()
    testbed, host = None, "127.0.0.1"
    if a.testbed:
        from tpi_node.testbed.netns import Testbed

        testbed = Testbed(a.testbed, os.environ.get("TPI_TESTBED_SUBNET", "10.231.7.0/24"))
        host = testbed.resolve("n0").ip
    common = ["--device", "cpu", "--speed", "1"]
    procs, logs = [], []
    p, log = start(
        "master",
        work,
        ["serve", "--model", str(model), "--dtype", a.dtype, "--port", str(http), "--grpc-port", str(grpc_port)]
        + ["--host", "0.0.0.0" if testbed else host, "--min-nodes", str(a.nodes), "--node-id", "master", *common],
        testbed,
    )
    procs.append(p), logs.append(log)
    for i in range(1, a.nodes):
        join = ["join", "--master", f"{host}:{grpc_port}", "--node-id", f"w{i}", *common]
        p, log = start(f"w{i}", work, join, testbed, i)
        procs.append(p), logs.append(log)
    url = f"http://{host}:{http}"
    try:
        t_start = time.monotonic()
        wait_health(url, a.nodes, procs, 3600)
        t_ready = time.monotonic() - t_start
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        complete(url, name)
        os.sync()  # start from clean pages: how much the start-up left to write back must not count
        time.sleep(2)
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait()
        t0, wall0 = time.monotonic(), time.time()
        complete(url, name)
        pause = time.monotonic() - t0
        fetched = [re.findall(r"shards: fetched .*", log.read_text(errors="replace")) for log in logs[1:-1]]
        result = {
            "preset": a.preset,
            "layers": a.layers,
            "nodes": a.nodes,
            "dtype": a.dtype,
            "model_bytes": tree_bytes(model),
            "ready_s": round(t_ready, 1),
            "failover_pause_s": round(pause, 2),
            "phases_s": phases(logs[0].read_text(errors="replace"), wall0),
            "survivor_fetches": [f[-1] if f else "" for f in fetched],
            "cache_bytes": {p.name: tree_bytes(p) for p in sorted(work.glob("home-*"))},
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(result, indent=1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
