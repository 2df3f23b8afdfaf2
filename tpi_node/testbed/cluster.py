"""A tpi-node cluster on the namespace testbed: `tpi-node serve` on n0, `tpi-node join` on the
others, each a real process inside its node (namespace, hostname, cgroups), each with its own
TPI_HOME (its own node id and shard cache, as on separate machines). Used by the tests and by
scripts/bench_testbed.py.

    with TestbedCluster(tb, model_dir, nodes=3, home_root=tmp) as c:
        c.url        # http://10.231.7.10:8000 (reached from the host through n0's link)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tpi_node.testbed.netns import Testbed, stop_process


def tpi_node_argv() -> list[str]:
    """The tpi-node command of this Python environment (the console script when installed)."""
    script = Path(sys.executable).parent / "tpi-node"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tpi_node.cli"]


class TestbedCluster:
    __test__ = False  # not a pytest class

    def __init__(
        self,
        tb: Testbed,
        model: Path | str,
        *,
        nodes: int,
        home_root: Path,
        http_port: int = 8000,
        grpc_port: int = 50051,
        discover: bool = False,
        serve_args: tuple[str, ...] = (),
        join_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.tb, self.model, self.n = tb, str(model), nodes
        self.home_root = Path(home_root)
        self.http_port, self.grpc_port = http_port, grpc_port
        self.discover = discover
        self.serve_args, self.join_args = tuple(serve_args), tuple(join_args)
        self.extra_env = env or {}
        self.procs: list[subprocess.Popen] = []
        self.argv: dict[str, list[str]] = {}  # node -> the command it was started with
        self.running: dict[str, subprocess.Popen] = {}  # node -> its latest process
        self.master_ip = tb.resolve("n0").ip

    @property
    def url(self) -> str:
        return f"http://{self.master_ip}:{self.http_port}"

    def _start(self, node: str, argv: list[str]) -> subprocess.Popen:
        home = self.home_root / node
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.tb.env(node), **self.extra_env, "TPI_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        log = open(self.home_root / f"{node}.log", "ab")
        p = subprocess.Popen(
            self.tb.command(node, argv),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(p)
        self.argv[node], self.running[node] = argv, p
        return p

    def restart(self, node: str) -> subprocess.Popen:
        """Start `node` again with the command it was first started with (same TPI_HOME: its node
        id and shard cache survive, as on a machine that rebooted); the log is appended to."""
        p = self.running.get(node)
        if p is not None and p.poll() is None:
            raise RuntimeError(f"{node} is still running (pid {p.pid})")
        return self._start(node, self.argv[node])

    def start(self, timeout: float = 120.0) -> str:
        tpi = tpi_node_argv()
        self._start(
            "n0",
            [
                *tpi,
                "serve",
                "--model",
                self.model,
                "--host",
                "0.0.0.0",
                "--port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--min-nodes",
                str(self.n),
                *self.serve_args,
            ],
        )
        master = [] if self.discover else ["--master", f"{self.master_ip}:{self.grpc_port}"]
        for i in range(1, self.n):
            self._start(f"n{i}", [*tpi, "join", *master, *self.join_args])
        self.wait_ready(timeout)
        return self.url

    def health(self) -> tuple[int, dict | None]:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None
        except (OSError, ValueError):
            return 0, None

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            code, body = self.health()
            if code == 200 and body and len(body.get("nodes", [])) >= self.n:
                return body
            for node, p in self.running.items():
                if p.poll() is not None:
                    raise RuntimeError(f"node {node} exited with {p.returncode}:\n{self.log(node)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster was not ready after {timeout:.0f} s (/health {code}):\n"
                    + "\n".join(self.log(f"n{i}") for i in range(self.n))
                )
            time.sleep(0.25)

    def log(self, node: str, tail: int = 3000) -> str:
        f = self.home_root / f"{node}.log"
        text = f.read_text(errors="replace") if f.exists() else ""
        return f"--- {node} ---\n{text[-tail:]}"

    def stop(self) -> None:
        # Workers first, then the master; each gets SIGTERM, then SIGKILL after a grace period.
        for p in reversed(self.procs):
            if p.poll() is None:
                stop_process(p.pid, grace=5)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def __enter__(self) -> TestbedCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def fresh_home_root(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
