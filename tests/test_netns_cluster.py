"""A cluster on an emulated LAN: network namespaces on one bridge (tests/netns_lan.py), real
`tpi-node serve` / `tpi-node join` processes, workers WITHOUT --master finding the master by mDNS;
a wrong or missing token refused; mutual TLS working and a plaintext peer refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cluster_procs import REPO, Node
from tests.netns_lan import Lan

pytestmark = pytest.mark.root
TOKEN = "tpi1-netns-test-token-0123456789abcdef"
HTTP, GRPC = 18000, 50051

# Runs inside a namespace: health polling and one completion through the official client.
CLIENT = r"""
import json, sys, time, urllib.request, urllib.error
url, nodes, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, last = time.monotonic() + timeout, None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            h = json.loads(r.read())
            if len(h["nodes"]) == nodes:
                break
            last = h
    except (urllib.error.URLError, OSError) as e:
        last = str(e)
    time.sleep(0.2)
else:
    print(json.dumps({"error": f"not ready: {last}"})); sys.exit(0)
import openai
c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
model = c.models.list().data[0].id
out = c.completions.create(model=model, prompt="Hello, my name is", max_tokens=8, temperature=0,
                           extra_body={"ignore_eos": True})
print(json.dumps({"health": h, "text": out.choices[0].text, "finish": out.choices[0].finish_reason,
                  "tokens": out.usage.completion_tokens}))
"""

# Runs inside a namespace: a plaintext gRPC call to a TLS master must not get through.
PLAINTEXT = r"""
import sys, grpc
from tpi_node.proto import tpi_pb2 as pb, tpi_pb2_grpc as rpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        rpc.MasterStub(ch).Status(pb.StatusRequest(), timeout=5)
        print("ACCEPTED")
    except grpc.RpcError as e:
        print("REFUSED", e.code().name)
"""


@pytest.fixture(scope="module")
def lan():
    why = Lan.unavailable()
    if why:
        pytest.skip(why)
    with Lan(4) as lan:
        yield lan


def _in_ns(lan: Lan, i: int, script: str, *args: str, timeout: float = 90) -> str:
    r = subprocess.run(
        lan.cmd(i, [sys.executable, "-c", script, *args]),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def _complete(lan: Lan, nodes: int, procs: list[Node], port: int = HTTP) -> dict:
    out = json.loads(_in_ns(lan, 0, CLIENT, f"http://127.0.0.1:{port}", str(nodes), "90"))
    if "error" in out:
        logs = "\n".join(f"--- {p.name}\n{p.log()[-2500:]}" for p in procs)
        raise AssertionError(f"{out['error']}\n{logs}")
    return out


def _wait_exit(node: Node, timeout: float = 60) -> int:
    try:
        return node.wait_exit(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{node.name} did not exit:\n{node.log()[-2000:]}") from None


def test_mdns_join_token_and_refusals(lan, tmp_path, tiny_model_dir):
    model = str(tiny_model_dir("tiny-llama3"))
    env = {"TPI_CLUSTER_TOKEN": TOKEN}
    master = Node(
        "master",
        tmp_path,
        [
            "serve",
            "--model",
            model,
            "--host",
            "0.0.0.0",
            "--port",
            str(HTTP),
            "--grpc-port",
            str(GRPC),
            "--min-nodes",
            "3",
            "--cluster",
            "lab",
            "--auto-admit",
        ],
        wrap=lan.cmd(0, []),
        env=env,
    )
    join = ["join", "--cluster", "lab", "--discover-timeout", "20"]  # no --master
    workers = [Node(f"worker{i}", tmp_path, join, wrap=lan.cmd(i, []), env=env) for i in (1, 2)]
    procs = [master, *workers]
    try:
        out = _complete(lan, 3, procs)
        assert out["tokens"] == 8 and out["finish"] == "length" and out["text"]
        addrs = {n["id"]: n["address"] for n in out["health"]["nodes"]}
        assert len(addrs) == 3
        for w in workers:
            assert "found master" in w.log() and f"{lan.ip(0)}:{GRPC}" in w.log(), w.log()[-2000:]

        # three refused at once, from the fourth machine:
        # a worker of another cluster name finds nothing of its own and says what it saw
        other = Node(
            "other-cluster",
            tmp_path,
            ["join", "--cluster", "home", "--discover-timeout", "3"],
            wrap=lan.cmd(3, []),
            env=env,
        )
        # a wrong token: the worker refuses the master that cannot prove the token, and stops
        wrong = Node(
            "wrong-token",
            tmp_path,
            join,
            wrap=lan.cmd(3, []),
            env={"TPI_CLUSTER_TOKEN": "tpi1-some-other-token-fedcba9876543210"},
        )
        # no token at all: the master refuses it
        none = Node("no-token", tmp_path, join, wrap=lan.cmd(3, []))
        procs += [other, wrong, none]
        assert _wait_exit(other) == 2
        assert "no master of cluster 'home'" in other.log() and "'lab'" in other.log()
        assert _wait_exit(wrong) == 2
        assert "master does not know this cluster's token" in wrong.log()
        assert _wait_exit(none) == 2
        assert "this cluster needs a token" in none.log()
        # neither joined: still three nodes, still serving
        assert len(_complete(lan, 3, procs)["health"]["nodes"]) == 3

        # --auto-admit: a fourth machine with the token joins the running cluster at an idle moment
        fourth = Node("worker3", tmp_path, join, wrap=lan.cmd(3, []), env=env)
        procs.append(fourth)
        out = _complete(lan, 4, procs)
        assert out["tokens"] == 8 and len(out["health"]["nodes"]) == 4
        assert "admitting" in master.log() and "discovered worker" in master.log()
    finally:
        for p in procs:
            p.stop()


def test_tls_cluster_works_plaintext_refused(lan, tmp_path, tiny_model_dir):
    from tpi_node.cluster.tls import make_cluster_certs

    model = str(tiny_model_dir("tiny-llama3"))
    certs, stranger = tmp_path / "certs", tmp_path / "stranger-certs"
    make_cluster_certs(certs, ("worker",))
    make_cluster_certs(stranger, ("worker",))
    http, grpc_port = HTTP + 1, GRPC + 1
    master = Node(
        "tls-master",
        tmp_path,
        [
            "serve",
            "--model",
            model,
            "--host",
            "0.0.0.0",
            "--port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--min-nodes",
            "2",
            "--cluster",
            "sec",
            "--certs",
            str(certs),
        ],
        wrap=lan.cmd(0, []),
    )
    worker = Node("tls-worker", tmp_path, ["join", "--cluster", "sec", "--certs", str(certs)], wrap=lan.cmd(1, []))
    procs = [master, worker]
    try:
        # a worker whose certificate another CA signed, started now: it dials for its --dial-timeout
        # while the cluster forms and serves (its TLS handshakes fail once the master listens)
        bad = Node(
            "stranger",
            tmp_path,
            [
                "join",
                "--master",
                f"{lan.ip(0)}:{grpc_port}",
                "--tls-cert",
                str(stranger / "worker.crt"),
                "--tls-key",
                str(stranger / "worker.key"),
                "--tls-ca",
                str(certs / "ca.crt"),
                "--dial-timeout",
                "10",
            ],
            wrap=lan.cmd(3, []),
        )
        procs.append(bad)
        out = _complete(lan, 2, procs, port=http)
        assert out["tokens"] == 8 and out["text"]
        # a plaintext peer cannot even make a call
        assert _in_ns(lan, 2, PLAINTEXT, f"{lan.ip(0)}:{grpc_port}") == "REFUSED UNAVAILABLE"
        # the worker of another CA never gets a connection: it gives up after its dial timeout, saying why
        assert _wait_exit(bad) == 2
        assert "ready; serving" not in bad.log() and "cannot reach the master" in bad.log(), bad.log()[-2000:]
        assert len(_complete(lan, 2, procs, port=http)["health"]["nodes"]) == 2
    finally:
        for p in procs:
            p.stop()
