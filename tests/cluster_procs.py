"""Real `tpi-node serve` / `tpi-node join` processes for cluster tests: each node gets its own
TPI_HOME (its own node id and shard cache, like a separate machine) and a log file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # newer openai releases ship httpx as httpx2
    import httpx2 as httpx

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tpi_node.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(
        self, name: str, root: Path, argv: list[str], wrap: list[str] | None = None, env: dict | None = None
    ) -> None:
        self.name, self.home = name, root / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = root / f"{name}.log"
        self.argv, self.wrap, self.env = argv, wrap or [], env or {}
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> Node:
        env = {**os.environ, "TPI_HOME": str(self.home), "PYTHONPATH": str(REPO), **self.env}
        env.pop("TPI_CLUSTER_TOKEN", None) if "TPI_CLUSTER_TOKEN" not in self.env else None
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.wrap + CLI + self.argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        return self

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)


def wait_health(url: str, nodes: int, timeout: float, procs: list[Node] = ()) -> dict:
    """Poll GET {url}/health until 200 with `nodes` nodes; fail early when a process died."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited with {p.proc.returncode}:\n{p.log()[-3000:]}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            last = r.status_code
            if r.status_code == 200 and len(r.json()["nodes"]) == nodes:
                return r.json()
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.log()[-2000:]}" for p in procs)
    raise AssertionError(f"cluster at {url} not ready with {nodes} nodes in {timeout} s (last: {last})\n{logs}")
