"""No silent waits, no side doors. Two `tpi-node join` started on one machine with one home claim
distinct ids (the second says so) and the cluster forms; two nodes given the same --node-id get a
refusal that names the id, on both sides, at once; a waiting master keeps saying what it waits for.
With --api-key, the cluster's state (/cluster.json, /metrics, /health's details) needs the key.
A gloo ring (plain, unauthenticated ports) is refused in a cluster with a token or certificates;
`run` hands its TLS files and token (by environment, not argv) to its local workers; a worker
stopped by SIGTERM, once or repeatedly, exits without a traceback; the master's counters never go
back across re-plans; zeroconf is loaded only when discovery is used."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster_procs import Node, free_port, wait_health
from tpi_node.cluster.identity import claim


def test_a_claimed_id_is_not_given_twice_and_comes_back_when_released(tmp_path):
    import tpi_node.cluster.identity as identity

    assert claim("box-1234abcd", tmp_path) == "box-1234abcd"
    assert claim("box-1234abcd", tmp_path) == "box-1234abcd-2"  # a second holder on this machine
    assert claim("box-1234abcd", tmp_path) == "box-1234abcd-3"
    for f in identity._CLAIMS[-3:]:  # the processes end: the kernel drops their locks
        f.close()
    del identity._CLAIMS[-3:]
    assert claim("box-1234abcd", tmp_path) == "box-1234abcd"


def test_two_joins_from_one_machine_form_the_cluster_and_a_duplicate_id_is_refused(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("tiny-llama"))
    http, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    serve = ["serve", "--model", model, "--device", "cpu", "--port", str(http), "--grpc-port", str(grpc_port)]
    join = ["join", "--master", f"127.0.0.1:{grpc_port}", "--device", "cpu"]
    shared_home = {"TPI_HOME": str(tmp_path / "one-machine")}
    master = Node("master", tmp_path, serve + ["--min-nodes", "3"])
    a = Node("join-a", tmp_path, join, env=shared_home)
    time.sleep(1.0)  # a takes the machine's id first
    b = Node("join-b", tmp_path, join, env=shared_home)
    procs = [master, a, b]
    try:
        health = wait_health(url, 3, 90, procs)
        ids = sorted(n["id"] for n in health["nodes"])
        assert len(set(ids)) == 3 and any(i.endswith("-2") for i in ids), ids
        assert "held by another tpi-node process on this machine" in b.log()

        # the same explicit id twice, before the plan is formed: the second is refused at once
        http2, grpc2 = free_port(), free_port()
        serve2 = ["serve", "--model", model, "--device", "cpu", "--port", str(http2), "--grpc-port", str(grpc2)]
        master2 = Node("master2", tmp_path, serve2 + ["--min-nodes", "3"])
        twin = ["join", "--master", f"127.0.0.1:{grpc2}", "--device", "cpu", "--node-id", "twin"]
        first = Node("twin-1", tmp_path, twin)
        procs += [master2, first]
        deadline = time.monotonic() + 60
        while "joined (2 of 3)" not in master2.log() and time.monotonic() < deadline:
            assert first.alive(), first.log()[-2000:]
            time.sleep(0.2)
        t0 = time.monotonic()
        second = Node("twin-2", tmp_path, twin)
        procs.append(second)
        assert second.wait_exit(30) != 0
        took = time.monotonic() - t0
        assert "node id twin is already taken by a node waiting to join" in second.log(), second.log()[-2000:]
        assert "refused node twin" in master2.log() and first.alive()
        deadline = time.monotonic() + 15  # and the master keeps saying what it waits for
        while "waiting for 1 more node(s) to join (in: " not in master2.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "waiting for 1 more node(s) to join (in: " in master2.log(), master2.log()[-1500:]
        print(f"\nduplicate id refused {took:.1f} s after the second join started (process start included)")
    finally:
        for p in procs:
            p.stop()


def test_with_an_api_key_the_cluster_state_needs_it_and_health_is_bare(tiny_model_dir, tmp_path):
    import httpx

    http, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    argv = ["serve", "--model", str(tiny_model_dir("tiny-llama")), "--device", "cpu", "--port", str(http)]
    node = Node("keyed", tmp_path, argv + ["--grpc-port", str(grpc_port), "--api-key", "k3y"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert node.alive(), node.log()[-2000:]
            time.sleep(0.2)
        key = {"Authorization": "Bearer k3y"}
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # no nodes, addresses or plan
        assert httpx.get(f"{url}/health", headers=key).json()["nodes"]
        for path in ("/cluster.json", "/metrics"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
            assert httpx.get(url + path, headers=key).status_code == 200, path
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "tpi-node-api-key" in page.text  # the page holds no data
        status = [sys.executable, "-m", "tpi_node.cli", "status", "--master", url]
        refused = subprocess.run(status, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "needs its API key" in refused.stderr, refused.stderr[-500:]
        shown = subprocess.run(status + ["--api-key", "k3y"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "master" in shown.stdout, shown.stderr[-500:]
    finally:
        node.stop()


def test_open_challenges_are_bounded_per_peer_and_a_flood_evicts_only_its_own():
    from tpi_node.cluster import auth

    v = auth.JoinVerifier(auth.new_token())
    worker = auth.JoinProver("t", "w1")  # its token is irrelevant here: only the table is checked
    sn_worker, _ = v.challenge("w1", worker.client_nonce, peer="ipv4:10.0.0.2:40000")
    for i in range(5000):  # one peer floods
        v.challenge("x", bytes([i % 256]) * 32, peer="ipv4:10.0.0.9:50000")
    assert v.open_challenges("ipv4:10.0.0.9:50000") == auth.MAX_PENDING_PER_PEER
    assert v.open_challenges("ipv4:10.0.0.2:40000") == 1
    for p in range(auth.MAX_PENDING + 10):  # many peers, one challenge each: the table stays bounded
        v.challenge("y", b"z" * 32, peer=f"ipv4:10.0.1.{p % 250}:{p}")
    assert v.open_challenges() == auth.MAX_PENDING


def test_a_worker_joins_while_one_connection_floods_the_master_with_challenges(tiny_model_dir, tmp_path):
    import secrets
    import threading

    import grpc

    from tpi_node.cluster import auth
    from tpi_node.proto import tpi_pb2 as pb
    from tpi_node.proto import tpi_pb2_grpc as rpc

    token = auth.new_token()
    http, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    serve = ["serve", "--model", str(tiny_model_dir("tiny-llama")), "--device", "cpu", "--port", str(http)]
    master = Node("master", tmp_path, serve + ["--grpc-port", str(grpc_port), "--min-nodes", "2", "--token", token])
    sent, stop = [0], threading.Event()

    def flood() -> None:  # 5,000 challenges with fresh nonces, never answered
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            stub = rpc.MasterStub(ch)
            while sent[0] < 5000 and not stop.is_set():
                stub.Challenge(pb.ChallengeRequest(node_id="flood", client_nonce=secrets.token_bytes(32)), timeout=5)
                sent[0] += 1

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    procs = [master]
    try:
        while sent[0] < 500:  # the flood is on before the worker comes
            assert flooder.is_alive() and master.alive(), master.log()[-2000:]
            time.sleep(0.05)
        t0 = time.monotonic()
        procs.append(Node("worker", tmp_path, ["join", "--master", f"127.0.0.1:{grpc_port}", "--token", token]))
        wait_health(url, 2, 60, procs)
        took = time.monotonic() - t0
        assert took < 10, took
        print(f"\nworker in after {took:.1f} s with {sent[0]} flood challenges sent")
    finally:
        stop.set()
        flooder.join(10)
        for p in procs:
            p.stop()


CLI = [sys.executable, "-m", "tpi_node.cli"]


def test_gloo_is_refused_in_a_cluster_with_a_token_or_certificates(tmp_path):
    from tpi_node.cluster import auth
    from tpi_node.cluster.master import refuse_unauthenticated_ring
    from tpi_node.cluster.tls import make_cluster_certs
    from tpi_node.errors import UserError

    refuse_unauthenticated_ring(True, None, False)  # an open, plaintext cluster may use it
    refuse_unauthenticated_ring(False, "t" * 20, True)  # the star is fine with both
    with pytest.raises(UserError, match="a cluster token and TLS certificates"):
        refuse_unauthenticated_ring(True, "t" * 20, True)
    make_cluster_certs(tmp_path / "certs")
    env = {k: v for k, v in os.environ.items() if k != "TPI_CLUSTER_TOKEN"} | {"TPI_HOME": str(tmp_path / "home")}
    for argv, given in (
        (["serve", "--token", auth.new_token()], "a cluster token"),
        (["run", "--certs", str(tmp_path / "certs")], "TLS certificates"),
    ):
        # refused before the model is even looked at (this one does not exist)
        cmd = CLI + argv + ["--collective", "gloo", "--model", "no-such-model", "--device", "cpu"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2, r.stderr[-2000:]
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and line.startswith("tpi-node: error: --collective gloo"), line
        assert f"cannot be used with {given}" in line and "unauthenticated" in line and "--collective star" in line


def _loaded(pid: int, name: str) -> bool:
    """Whether process `pid` has a file of package `name` mapped (its compiled modules)."""
    return f"/{name}/" in Path(f"/proc/{pid}/maps").read_text()


def test_zeroconf_is_imported_only_when_discovery_is_used():
    code = (
        "import sys; from tpi_node.cli import build_parser; build_parser()\n"
        "from tpi_node.commands import compose, join, run, serve, status\n"
        "print('zeroconf' in sys.modules, 'ifaddr' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stderr[-2000:]


def _clean(log: str) -> bool:
    return not any(bad in log for bad in ("Traceback", "Exception ignored", "ERROR asyncio", "never retrieved"))


SLOW_EXIT = """import atexit, sys, time
def _slow_exit():
    print("slow exit: in an atexit callback", file=sys.stderr, flush=True)
    time.sleep(1.5)
atexit.register(_slow_exit)
"""


def test_a_worker_stopped_by_sigterm_exits_cleanly_even_when_signalled_while_exiting(tiny_model_dir, tmp_path):
    """SIGTERM once: exit code 0, no traceback. SIGTERM again while the worker runs its exit hooks
    (as `run` does to a worker slow to exit after the master told it to go): no 'Exception ignored
    in atexit callback ... SystemExit'. An exit hook that sleeps (sitecustomize) holds the worker
    in that phase. A loopback master and a worker given --master load no zeroconf."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_EXIT)
    http, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    serve = ["serve", "--model", str(tiny_model_dir("tiny-llama")), "--device", "cpu", "--port", str(http)]
    master = Node("master", tmp_path, serve + ["--grpc-port", str(grpc_port), "--min-nodes", "2"])
    join = ["join", "--master", f"127.0.0.1:{grpc_port}", "--device", "cpu"]
    worker = Node("worker", tmp_path, join, env={"PYTHONPATH": f"{site}{os.pathsep}{Path(__file__).parents[1]}"})
    procs = [master, worker]
    try:
        wait_health(url, 2, 90, procs)
        import zeroconf

        if any(f.suffix == ".so" for f in Path(zeroconf.__file__).parent.iterdir()):  # compiled: visible in maps
            assert not _loaded(master.proc.pid, "zeroconf") and not _loaded(worker.proc.pid, "zeroconf")
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait_exit(30) == 0
        assert "slow exit" in worker.log() and _clean(worker.log()), worker.log()[-3000:]

        worker.start()  # the same node id comes back: admitted again
        deadline = time.monotonic() + 90
        while worker.log().count("ready; serving steps") < 2:
            assert worker.alive() and time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.05)
        worker.proc.send_signal(signal.SIGTERM)
        while worker.log().count("slow exit") < 2:  # it is in its exit hooks now
            assert worker.alive() and time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.02)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait_exit(30) in (0, -signal.SIGTERM)
        assert _clean(worker.log()), worker.log()[-3000:]
    finally:
        for p in procs:
            p.stop()


def test_run_gives_its_local_workers_its_tls_files_and_the_token_out_of_argv(tiny_model_dir, tmp_path):
    import psutil

    from tpi_node.cluster import auth
    from tpi_node.cluster.tls import make_cluster_certs

    certs, token = tmp_path / "certs", auth.new_token()
    make_cluster_certs(certs, ("laptop",))  # no worker.*: the local workers use the master's files
    http = free_port()
    argv = ["run", "--model", str(tiny_model_dir("tiny-llama")), "--device", "cpu", "--port", str(http)]
    node = Node("run", tmp_path, argv + ["--nodes", "2", "--certs", str(certs)], env={"TPI_CLUSTER_TOKEN": token})
    try:
        wait_health(f"http://127.0.0.1:{http}", 2, 90, [node])
        children = psutil.Process(node.proc.pid).children()
        assert len(children) == 1, children
        cmdline = children[0].cmdline()
        assert "join" in cmdline and "--certs" in cmdline and str(certs) in cmdline, cmdline
        assert not any(token in a for a in cmdline) and children[0].environ()["TPI_CLUSTER_TOKEN"] == token
    finally:
        node.stop()


def test_the_masters_counters_never_go_back_across_re_plans():
    """Each plan opens a runner whose counters start at zero; a request that spans a re-plan
    takes the difference of two Driver.stats(): it must not come out negative."""
    from types import SimpleNamespace

    from tpi_node.cluster.driver import ClusterDriver
    from tpi_node.weights.counters import NodeCounters

    class Runner:
        def __init__(self, **stats) -> None:
            self.s = stats

        def node_stats(self) -> dict:
            return dict(self.s)

    coordinator = SimpleNamespace(deployment=None, start_admitter=lambda idle: None)
    driver = ClusterDriver(coordinator)
    assert driver.stats() == {}
    first = Runner(steps=10, tokens=40, bytes_read=500, load_s=1.5, window=4, peak_rss_bytes=900, kv_pool_bytes=64)
    coordinator.deployment = SimpleNamespace(runner=first)
    arrived = driver.stats()["master"]  # a request arrives ...
    first.s.update(steps=12, tokens=48, bytes_read=600)  # ... the plan serves on ...
    coordinator.deployment = SimpleNamespace(  # ... a worker is lost: a new plan, a new runner from zero
        runner=Runner(steps=1, tokens=4, bytes_read=50, load_s=0.25, window=2, peak_rss_bytes=950, kv_pool_bytes=32)
    )
    done = driver.stats()["master"]  # ... and the request finishes
    assert (done["steps"], done["tokens"], done["bytes_read"], done["load_s"]) == (13, 52, 650, 1.75)
    assert (done["window"], done["peak_rss_bytes"], done["kv_pool_bytes"]) == (2, 950, 32)  # levels, not sums
    delta = NodeCounters.from_stats(done).minus(NodeCounters.from_stats(arrived))
    assert all(getattr(delta, k) >= 0 for k in ("bytes_read", "load_s", "tokens", "layers_loaded")), delta
    assert driver.stats()["master"] == done  # asked again: the same totals, nothing folded twice
