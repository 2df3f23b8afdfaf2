"""The namespace testbed (scripts/testbed): links really shaped, a real 3-node tpi-node cluster on
it serving the same greedy completion as one node on loopback, and nothing left after `down`.

Needs root and network namespaces; skipped with the reason elsewhere. Installs nftables (the
delay relay's redirect) with apt-get when it is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testbed_util import completion, loopback_completion
from tpi_node.errors import UserError

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
NAME, SUBNET = "tpitest", "10.231.8.0/24"
RATE_MBIT, LATENCY_MS = 300, 5.0

# A tiny TCP client/server run inside the nodes: echo for round trips, a sink for throughput.
PROBE = r"""
import socket, sys, time, hashlib
mode, port = sys.argv[1], 9100
if mode == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(); print("ready", flush=True)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(20):                       # echo 20 small messages
        d = b""
        while len(d) < 2304: d += c.recv(4096)
        c.sendall(d)
    h, n, total = hashlib.sha256(), 0, int(c.recv(12))
    while n < total:                          # then a bulk transfer: hash it, send the hash back
        d = c.recv(1 << 20); h.update(d); n += len(d)
    c.sendall(h.hexdigest().encode())
else:
    c = socket.create_connection((sys.argv[2], port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for i in range(20):
        msg = bytes([i]) * 2304; t = time.perf_counter(); c.sendall(msg); d = b""
        while len(d) < 2304: d += c.recv(4096)
        rtts.append(time.perf_counter() - t); assert d == msg
    data = bytes(range(256)) * (24_000_000 // 256)
    t = time.perf_counter(); c.sendall(b"%012d" % len(data)); c.sendall(data); got = c.recv(64).decode()
    dt = time.perf_counter() - t
    print(f'{{"rtt_ms": {sorted(rtts)[10] * 1e3:.3f}, "min_rtt_ms": {min(rtts) * 1e3:.3f}, '
          f'"mbit": {len(data) * 8 / dt / 1e6:.1f}, '
          f'"intact": {str(got == hashlib.sha256(data).hexdigest()).lower()}}}')
"""


def _why_no_testbed() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, cgroups)"
    if not shutil.which("nft") and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "-q", "nftables"], capture_output=True, env=env).returncode:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(["apt-get", "install", "-y", "-q", "nftables"], capture_output=True, env=env)
    from tpi_node.testbed.netns import check_host

    try:
        check_host()
    except UserError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def testbed():
    why = _why_no_testbed()
    if why:
        pytest.skip(why)
    from tpi_node.testbed.netns import Testbed
    from tpi_node.testbed.presets import make_spec

    tb = Testbed(NAME, SUBNET)
    spec = make_spec("tpi-paper", nodes=3, rate=f"{RATE_MBIT}mbit", latency_ms=LATENCY_MS, memory="3GiB", cpus=None)
    tb.up(spec)
    try:
        yield tb
    finally:
        tb.down()


def _left_over() -> list[str]:
    """Anything of the test testbed still on the machine."""
    from tpi_node.testbed.netns import STATE_ROOT, _own_cgroup

    left = [
        ns
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if ns.startswith(NAME)
    ]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [w for w in links.split() if w.startswith(NAME)]
    for ctrl in ("memory", "cpu"):
        cg = _own_cgroup(ctrl)
        if cg and (cg / NAME).exists():
            left.append(f"cgroup {cg / NAME}")
    if (STATE_ROOT / NAME).exists():
        left.append(str(STATE_ROOT / NAME))
    if shutil.which("iptables"):
        rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
        left += [r for r in rules.splitlines() if f"{NAME}-br" in r]
    return left


def test_links_have_the_latency_and_rate_asked_for(testbed):
    """Round trip between two nodes = 2 x the one-way latency; bulk rate at most the link rate;
    bytes arrive intact and in order through the delay relay. The bounds are the ones a busy
    machine cannot break: it only lengthens round trips (so the median one is bounded below, and
    the quickest of 20, the least disturbed, above) and a shaped link never runs faster than its
    rate (slower, when the relay waits for a core, only down to a gross misconfiguration)."""
    server = subprocess.Popen(
        testbed.command("n1", [sys.executable, "-c", PROBE, "server"]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        out = subprocess.run(
            testbed.command("n2", [sys.executable, "-c", PROBE, "client", testbed.resolve("n1").ip]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        m = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.kill()
        server.wait()
    assert m["intact"]
    assert m["rtt_ms"] >= 2 * LATENCY_MS * 0.97, m  # the median: a busy machine only adds to it
    assert m["min_rtt_ms"] < 2 * LATENCY_MS * 1.5, m  # the delay once each way, not twice
    assert 0.1 * RATE_MBIT < m["mbit"] <= 1.02 * RATE_MBIT, m
    print(f"\nround trip {m['min_rtt_ms']:.2f} ms at best, {m['rtt_ms']:.2f} median; {m['mbit']:.0f} Mbit/s")
    # The node's processes run inside its memory cgroup, with its hostname.
    name = subprocess.run(testbed.command("n2", ["hostname"]), capture_output=True, text=True).stdout.strip()
    assert name == f"{NAME}-n2"
    if testbed.node(2).memcg:  # cgroup v1 memory hierarchy (this machine kind)
        cgroup = subprocess.run(
            testbed.command("n2", ["cat", "/proc/self/cgroup"]), capture_output=True, text=True
        ).stdout
        assert f"/{NAME}/n2" in cgroup
        limit = Path(testbed.node(2).memcg, "memory.limit_in_bytes").read_text()
        assert int(limit) == 3 * 2**30


# Numbered messages echoed back while the latency changes under them: order and content must hold.
ECHO_STREAM = r"""
import socket, sys, struct, threading, time
port = 9101
if sys.argv[1] == "server":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(); print("ready", flush=True)
    c, _ = s.accept()
    while (d := c.recv(65536)):
        c.sendall(d)
else:
    c = socket.create_connection((sys.argv[2], port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.settimeout(30)
    print("connected", flush=True)
    sys.stdin.readline()                            # go
    total = int(float(sys.argv[3]) * 1000)
    def send():                                     # open loop: one 256-byte message per ms
        t0 = time.monotonic()
        for i in range(total):
            c.sendall(struct.pack("!I", i) * 64)
            time.sleep(max(0.0, t0 + (i + 1) / 1000 - time.monotonic()))
    threading.Thread(target=send, daemon=True).start()
    buf, want = b"", 0
    while want < total:
        buf += c.recv(65536)
        while len(buf) >= 256:
            msg, buf = buf[:256], buf[256:]
            assert msg == struct.pack("!I", want) * 64, (want, msg[:8])
            want += 1
    print(want, flush=True)
"""


def test_relay_keeps_order_while_the_latency_changes(testbed):
    """`shape --latency-ms` reaches open connections at once; bytes never overtake each other."""
    server = subprocess.Popen(
        testbed.command("n1", [sys.executable, "-c", ECHO_STREAM, "server"]), stdout=subprocess.PIPE, text=True
    )
    client = None
    try:
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.Popen(
            testbed.command("n2", [sys.executable, "-c", ECHO_STREAM, "client", testbed.resolve("n1").ip, "3"]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert client.stdout.readline().strip() == "connected"
        client.stdin.write("go\n")
        client.stdin.flush()
        for lat in (0.0, 3.0, 0.5, 8.0, 0.0, LATENCY_MS):  # shorter and longer, back and forth
            time.sleep(0.4)
            testbed.set_link(latency_ms=lat)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err[-2000:]
        assert int(out.strip()) == 3000  # every message, in order
    finally:
        for p in (server, client):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_three_node_cluster_matches_loopback(testbed, smollm2_dir, tmp_path):
    from tpi_node.testbed.cluster import TestbedCluster

    prompt, n = "The three primary colors are", 8
    expected = loopback_completion(smollm2_dir, prompt, n)
    # Latency 1 ms while the cluster forms (shards cross the shaped links), the preset's 5 ms
    # for the completion: the relay changes it without dropping the connections.
    testbed.set_link(latency_ms=1.0)
    with TestbedCluster(testbed, smollm2_dir, nodes=3, home_root=tmp_path) as cluster:
        nodes = cluster.health()[1]["nodes"]
        assert len(nodes) == 3
        testbed.set_link(latency_ms=LATENCY_MS)
        steps0 = _engine_steps(cluster.url)
        t0 = time.monotonic()
        got, tokens = completion(cluster.url, prompt, n, usage=True)
        elapsed = time.monotonic() - t0
        steps = _engine_steps(cluster.url) - steps0
    assert got == expected
    # Every step (one or more tokens: speculative drafts are checked in one) crosses 2 allreduces
    # x 30 layers x 2 link traversals of 5 ms: the latency is real. A lower bound only: a busy
    # machine makes it longer, never shorter.
    assert steps >= 1 and elapsed > steps * 2 * 30 * 2 * LATENCY_MS / 1000, (steps, tokens, elapsed)


def _engine_steps(url: str) -> float:
    """The master's forward steps so far (tpi_engine_steps on /metrics)."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("tpi_engine_steps_total ")))


def test_down_leaves_nothing(testbed):
    """Runs last in this module: take the testbed down (twice: idempotent) and look for leftovers."""
    testbed.down()
    assert testbed.down() == []
    assert _left_over() == []


def test_cli_up_status_down():
    why = _why_no_testbed()
    if why:
        pytest.skip(why)
    cli = [str(REPO / "scripts" / "testbed"), "--name", "tpicli", "--subnet", "10.231.10.0/24"]
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        up = subprocess.run(
            [*cli, "up", "--preset", "home-wifi", "--nodes", "2", "--memory", "512MiB"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert up.returncode == 0, up.stderr
        assert "10.231.10.11" in up.stdout
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, env=env)
        assert "100 Mbit/s, 5 ms" in status.stdout and "512 MiB" in status.stdout
        ex = subprocess.run(
            [*cli, "exec", "n1", "ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True, env=env
        )
        assert "10.231.10.11/24" in ex.stdout
        bad = subprocess.run([*cli, "exec", "n7", "true"], capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and "no node 'n7'" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        down = subprocess.run([*cli, "down"], capture_output=True, text=True, env=env)
    assert down.returncode == 0
    gone = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "tpicli" not in gone
