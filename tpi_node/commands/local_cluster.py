"""A cluster on this one machine: the master in this process, N-1 `tpi-node join` children
(what `run` and `generate --nodes N` start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tpi_node.cluster.membership import ClusterState
from tpi_node.commands.compose import RunningMaster, local_gpus_for, start_master
from tpi_node.engine.device import cpu_cores
from tpi_node.errors import UserError
from tpi_node.settings import MasterSettings


def share_cores(processes: int) -> int:
    """Threads per process when `processes` nodes share this machine: oversubscribed cores make
    every node wait for the slowest at each allreduce."""
    return max(1, cpu_cores() // processes)


def share_cores_with_local_workers(nodes: int) -> None:
    if nodes > 1 and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(share_cores(nodes))


def spawn_workers(
    address: str,
    n: int,
    base_id: str,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    devices: tuple[str, ...] = (),
) -> list[subprocess.Popen]:
    """n `tpi-node join` child processes (ps shows what they are) with flags `extra` and
    environment variables `env` on top of this process's; worker i on devices[i - 1] if given."""
    exe = Path(sys.executable).with_name("tpi-node")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "tpi_node.cli"]
    threads = os.environ.get("OMP_NUM_THREADS") or str(share_cores(n + 1))
    env = {**os.environ, "OMP_NUM_THREADS": threads, **(env or {})}
    return [
        subprocess.Popen(
            cmd
            # their master is this process: should it die, they go too (no --master-retry-s wait)
            + ["join", "--master", address, "--node-id", f"{base_id}-w{i}", "--master-retry-s", "0"]
            + (extra or [])
            + (["--device", devices[i - 1]] if devices else []),
            env=env,
        )
        for i in range(1, n + 1)
    ]


def worker_flags(s: MasterSettings) -> list[str]:
    """The settings the master's local workers take from it: every node it starts gets the same
    --memory-budget, the same --cache-size (they share this machine's shard cache) and the
    master's TLS: with --certs DIR they present the master's own
    certificate (they run on its machine, and DIR may hold no worker.*), with --tls-* the same
    files. The token goes through worker_env, never argv (which any local user can read)."""
    flags = ["--memory-budget", str(s.memory_budget)] if s.memory_budget else []
    flags += ["--cache-size", str(s.cache_size)] if s.cache_size else []
    if s.certs:
        flags += ["--certs", s.certs, "--cert-name", "master"]
    tls = (("--tls-cert", s.tls_cert), ("--tls-key", s.tls_key), ("--tls-ca", s.tls_ca))
    return flags + [x for flag, value in tls if value for x in (flag, value)]


def worker_env(s: MasterSettings) -> dict[str, str]:
    """The environment the master's local workers take from it: the cluster token."""
    return {"TPI_CLUSTER_TOKEN": s.token} if s.token else {}


def stop_children(children: list[subprocess.Popen], grace_s: float = 3.0) -> None:
    """After the master stopped (its workers were told MASTER_STOPPING and exit by themselves):
    SIGTERM whoever is still there after `grace_s`, SIGKILL after 5 s more."""
    deadline = time.monotonic() + grace_s
    for c in children:
        try:
            c.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in children:
        try:
            c.wait(timeout=5)
        except subprocess.TimeoutExpired:
            c.kill()


def wait_ready(running: RunningMaster, children: list[subprocess.Popen], timeout_s: float = 600.0) -> None:
    master = running.master
    deadline = time.monotonic() + timeout_s
    while not master.ready():
        if master.membership.state is ClusterState.FAILED:
            raise UserError(f"cannot form the cluster: {master.membership.reason}")
        dead = [c for c in children if c.poll() is not None]
        if dead:
            raise UserError(f"a local worker exited with code {dead[0].returncode} before the cluster was ready")
        if time.monotonic() > deadline:
            raise UserError(f"the cluster was not ready within {timeout_s:g} s")
        time.sleep(0.1)


class LocalCluster:
    """`generate --nodes N`: the master here, N-1 local workers, ready when constructed."""

    def __init__(self, s: MasterSettings, nodes: int) -> None:
        share_cores_with_local_workers(nodes)
        gpus = local_gpus_for(s, nodes)  # one GPU per node where they form an NVLink group
        self.running = start_master(s, nodes, 0, gpus)
        address = f"127.0.0.1:{self.running.port}"
        devices = tuple(f"cuda:{g}" for g in gpus[1:])
        self.children = spawn_workers(address, nodes - 1, "local", worker_flags(s), worker_env(s), devices)
        try:
            wait_ready(self.running, self.children)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.running.stop()
        stop_children(self.children)
