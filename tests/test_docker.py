"""The docker-compose testbed (docker/): a master and two workers in containers with memory, CPU
and link limits, the workers finding the master by mDNS, serve the same greedy completion as one
node on loopback; `down` leaves no container behind.

It sets up what it needs (as root): apt-get docker.io docker-compose debootstrap when missing,
starts dockerd when none runs (and stops it again), builds the base image once per machine
(docker/build-base; reused afterwards) and the tpi-node image (docker/build-image; cached
layers). Skipped, with the reason, only where Docker cannot run at all."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testbed_util import completion, loopback_completion

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "docker-compose.yml"
PROJECT = "tpitest"
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _sh(*argv, timeout=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def _install_docker() -> str | None:
    """Install the Debian packages the testbed needs; -> why that is impossible, or None."""
    missing = [
        pkg
        for pkg, tool in (("docker.io", "docker"), ("docker-compose", "docker-compose"), ("debootstrap", "debootstrap"))
        if not shutil.which(tool)
    ]
    if not missing:
        return None
    if not shutil.which("apt-get"):
        return f"Docker is not installed and there is no apt-get to install {', '.join(missing)}"
    r = _sh("apt-get", "install", "-y", "-q", *missing, env=APT_ENV, timeout=600)
    if r.returncode != 0:
        _sh("apt-get", "update", "-q", env=APT_ENV, timeout=300)
        r = _sh("apt-get", "install", "-y", "-q", *missing, env=APT_ENV, timeout=600)
    if r.returncode != 0:
        return f"cannot install {', '.join(missing)}: {r.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def docker():
    """A running dockerd (started here when none runs, stopped again afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to install and run Docker")
    why = _install_docker()
    if why:
        pytest.skip(why)
    started = None
    if _sh("docker", "info").returncode != 0:
        log = open("/tmp/tpi-test-dockerd.log", "ab")
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while _sh("docker", "info").returncode != 0:
            if started.poll() is not None or time.monotonic() > deadline:
                tail = Path("/tmp/tpi-test-dockerd.log").read_text(errors="replace")[-400:]
                started.kill()
                pytest.skip(f"Docker cannot run here: dockerd did not start ({tail.strip()})")
            time.sleep(0.5)
    try:
        yield
    finally:
        if started is not None:
            started.terminate()
            try:
                started.wait(timeout=30)
            except subprocess.TimeoutExpired:
                started.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, nodes: int, compose, timeout: float) -> dict:
    import json
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=3) as r:
                body = json.loads(r.read())
                if len(body.get("nodes", [])) >= nodes:
                    return body
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            logs = compose("logs", "--no-color", "--tail", "30").stdout
            raise AssertionError(f"the compose cluster was not ready in {timeout:.0f} s:\n{logs[-4000:]}")
        time.sleep(1)


def test_compose_cluster_matches_loopback(docker, smollm2_dir):
    t0 = time.monotonic()
    r = _sh(str(REPO / "docker" / "build-image"), timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    t_built = time.monotonic()

    port = _free_port()
    env = {
        **os.environ,
        "TPI_MODEL_DIR": str(smollm2_dir),
        "TPI_MODEL_NAME": Path(smollm2_dir).name,
        "TPI_HTTP_PORT": str(port),
        "TPI_NODES": "3",
        "TPI_WORKERS": "2",
        "TPI_NODE_MEMORY": "2g",
        "TPI_NODE_CPUS": "1.0",
        "LINK_RATE": "300mbit",
        "LINK_LATENCY_MS": "1",
    }

    def compose(*args, timeout=300):
        return _sh("docker-compose", "-p", PROJECT, "-f", str(COMPOSE), *args, env=env, timeout=timeout)

    refused = compose("config")  # no cluster token: the master would listen on the lan unguarded
    assert refused.returncode != 0 and "set TPI_CLUSTER_TOKEN first" in refused.stderr, refused.stderr[-1000:]
    env["TPI_CLUSTER_TOKEN"] = _sh(sys.executable, "-m", "tpi_node.cli", "token", cwd=REPO).stdout.strip()

    compose("down", "-v", "--remove-orphans")
    prompt, n = "The three primary colors are", 8
    expected = loopback_completion(smollm2_dir, prompt, n)
    try:
        up = compose("up", "-d", "--scale", "worker=2")
        assert up.returncode == 0, up.stderr[-3000:]
        url = f"http://127.0.0.1:{port}"
        health = _wait_health(url, 3, compose, timeout=300)
        t_ready = time.monotonic()
        assert len(health["nodes"]) == 3
        got = completion(url, prompt, n)
        logs = compose("logs", "--no-color").stdout
    finally:
        down = compose("down", "-v", "--remove-orphans")
    assert got == expected
    # Each worker found the master by mDNS (no --master given); every node shaped its link.
    assert logs.count("[tpi-node] found") >= 2, logs[-3000:]
    assert logs.count("eth0 shaped to 300mbit") >= 3 and logs.count("eth0 latency 1 ms") >= 3
    assert down.returncode == 0
    left = _sh("docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout
    assert left.strip() == ""
    print(
        f"\n[test_docker] build {t_built - t0:.0f} s, cluster ready {t_ready - t_built:.0f} s, "
        f"total {time.monotonic() - t0:.0f} s"
    )
