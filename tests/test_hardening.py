"""No silent waits, no side doors. Two `tpi-node join` started on one machine with one home claim
distinct ids (the second says so) and the cluster forms; two nodes given the same --node-id get a
refusal that names the id, on both sides, at once; a waiting master keeps saying what it waits for.
With --api-key, the cluster's state (/cluster.json, /metrics, /health's details) needs the key."""

from __future__ import annotations

import subprocess
import sys
import time

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
