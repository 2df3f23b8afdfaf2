"""Run code in a private network namespace so mDNS multicast never leaves the test.

`in_private_net(script)` runs `python -c script` under `unshare -n` with loopback up and
multicast-capable; skips the calling test (with the reason) where namespaces cannot be made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo"


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare and ip (util-linux, iproute2)"
    r = subprocess.run(["unshare", "-n", "sh", "-c", SETUP], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()[:200]}"
    return None


def in_private_net(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = ["unshare", "-n", "sh", "-c", f'{SETUP} && exec "$0" -c "$1"', sys.executable, script]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
