"""Cluster token handshake (HMAC challenge-response) and mutual TLS for gRPC, with a real gRPC
server on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from tpi_node.cluster import auth, tls
from tpi_node.cluster.identity import machine_fingerprint, node_id
from tpi_node.errors import UserError

TOKEN = auth.new_token()


# ---------------------------------------------------------------- token handshake


def test_handshake_both_sides_prove():
    master, worker = auth.JoinVerifier(TOKEN), auth.JoinProver(TOKEN, "w1")
    sn, master_proof = master.challenge("w1", worker.client_nonce)
    proof = worker.answer(sn, master_proof)  # the worker checks the master first
    master.verify("w1", worker.client_nonce, sn, proof)
    # nothing on the wire contains the token or its key
    for blob in (worker.client_nonce, sn, master_proof, proof):
        assert TOKEN.encode() not in blob and len(blob) == 32


def test_wrong_token_refused_by_master():
    master, worker = auth.JoinVerifier(TOKEN), auth.JoinProver(auth.new_token(), "w1")
    sn, master_proof = master.challenge("w1", worker.client_nonce)
    with pytest.raises(auth.AuthError, match="master does not know"):
        worker.answer(sn, master_proof)  # a worker with another token also refuses this master
    # even a worker that skips its check cannot make a proof the master accepts
    fake = auth._proof(auth._key(auth.new_token()), b"worker", "w1", worker.client_nonce, sn)
    with pytest.raises(auth.AuthError, match="wrong cluster token"):
        master.verify("w1", worker.client_nonce, sn, fake)


def test_proof_cannot_be_replayed_or_reflected():
    master, worker = auth.JoinVerifier(TOKEN), auth.JoinProver(TOKEN, "w1")
    sn, master_proof = master.challenge("w1", worker.client_nonce)
    proof = worker.answer(sn, master_proof)
    master.verify("w1", worker.client_nonce, sn, proof)
    with pytest.raises(auth.AuthError, match="expired or replayed"):
        master.verify("w1", worker.client_nonce, sn, proof)
    # the master's own proof, reflected back as a worker proof, is refused
    sn2, master_proof2 = master.challenge("w1", worker.client_nonce)
    with pytest.raises(auth.AuthError, match="wrong cluster token"):
        master.verify("w1", worker.client_nonce, sn2, master_proof2)
    # a challenge issued to another node id does not admit this one
    w2 = auth.JoinProver(TOKEN, "w2")
    sn3, mp3 = master.challenge("w1", w2.client_nonce)
    with pytest.raises(auth.AuthError):
        master.verify("w2", w2.client_nonce, sn3, auth._proof(auth._key(TOKEN), b"worker", "w2", w2.client_nonce, sn3))


def test_a_proof_opens_only_what_it_was_made_for():
    """A join proof does not read Status, a status proof does not join; a worker's ticket reads
    Status; an open cluster answers Status to anyone."""
    from tpi_node.cluster.join_auth import MasterAuth
    from tpi_node.proto import tpi_pb2 as pb

    m = MasterAuth(TOKEN)

    def proved(purpose: bytes, node: str = "ops") -> pb.StatusRequest:
        caller = auth.JoinProver(TOKEN, node, purpose)
        reply = m.challenge(pb.ChallengeRequest(node_id=node, client_nonce=caller.client_nonce))
        proof = caller.answer(bytes(reply.server_nonce), bytes(reply.master_proof))
        return pb.StatusRequest(
            node_id=node, client_nonce=caller.client_nonce, server_nonce=reply.server_nonce, auth_proof=proof
        )

    assert m.status_refusal(proved(auth.STATUS)) is None
    assert m.status_refusal(proved(auth.JOIN)) == "wrong cluster token"
    as_join = proved(auth.STATUS, "w1")
    join = pb.JoinRequest(node_id="w1", client_nonce=as_join.client_nonce, server_nonce=as_join.server_nonce)
    join.auth_proof = as_join.auth_proof
    assert m.refusal(join) == "wrong cluster token"
    assert "needs its token" in m.status_refusal(pb.StatusRequest(node_id="ops"))
    ticket = m.tickets.issue("w1")
    assert m.status_refusal(pb.StatusRequest(node_id="w1", ticket=ticket)) is None
    assert "no valid join ticket" in m.status_refusal(pb.StatusRequest(node_id="w2", ticket=ticket))
    assert MasterAuth(None).status_refusal(pb.StatusRequest()) is None


def test_token_rules():
    from tpi_node.settings import JoinSettings, load

    def token(flags: dict, environ: dict):  # as `tpi-node join` resolves it
        return auth.resolve_token(load(JoinSettings, flags, environ).token)

    assert auth.new_token().startswith("tpi1-") and auth.new_token() != auth.new_token()
    with pytest.raises(UserError, match="too short"):
        auth.resolve_token("short")
    env = {"TPI_CLUSTER_TOKEN": TOKEN}
    assert token({}, env) == TOKEN
    assert token({"token": "x" * 20}, env) == "x" * 20  # the flag wins over the environment
    assert token({}, {}) is None


def test_token_command_prints_a_token():
    out = subprocess.run(
        [sys.executable, "-c", "from tpi_node.cli import main; main(['token'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith("tpi1-") and len(out.stdout.strip()) > 40


# ---------------------------------------------------------------- node ids


def test_node_id_stable_here_and_remade_on_another_machine(tmp_path, monkeypatch):
    a = node_id(tmp_path, "worker")
    assert a == node_id(tmp_path, "worker") and a != node_id(tmp_path, "master")
    # a config folder copied to another machine: its fingerprint differs -> a fresh id there
    monkeypatch.setattr("tpi_node.cluster.identity.machine_fingerprint", lambda: "another-machine")
    b = node_id(tmp_path, "worker")
    assert b != a and b == node_id(tmp_path, "worker")
    monkeypatch.undo()
    assert node_id(tmp_path, "worker") not in (a, b)  # and back here: this machine's own, anew
    assert len(machine_fingerprint()) == 16


# ---------------------------------------------------------------- certificates and mTLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    tls.make_cluster_certs(d, ("worker", "w2"))
    other = tmp_path_factory.mktemp("other-ca")
    tls.make_cluster_certs(other, ("worker",))
    return d, other


def test_certs_chain_verifies(certs):
    d, other = certs
    ca = (d / "ca.crt").read_bytes()
    for name in ("master", "worker", "w2"):
        tls.verify_chain(ca, (d / f"{name}.crt").read_bytes())
        assert (d / f"{name}.key").stat().st_mode & 0o077 == 0  # private keys are 0600
    from cryptography.exceptions import InvalidSignature

    with pytest.raises((ValueError, InvalidSignature)):  # another cluster's CA signed it
        tls.verify_chain(ca, (other / "worker.crt").read_bytes())


def _echo_server(creds) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "tpi.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _call(channel) -> bytes:
    with channel:
        return channel.unary_unary("/tpi.test.Echo/Echo")(b"hi", timeout=5)


def _secure(port: int, files: tls.TlsFiles | None = None, creds=None):
    creds = creds or tls.channel_credentials(files)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=tls.TLS_CHANNEL_OPTIONS)


def test_mtls_accepts_cluster_cert_refuses_others(certs):
    d, other = certs
    server, port = _echo_server(tls.server_credentials(tls.tls_files("master", certs_dir=str(d))))
    try:
        assert _call(_secure(port, tls.tls_files("worker", certs_dir=str(d)))) == b"echo:hi"
        assert _call(_secure(port, tls.tls_files("worker", certs_dir=str(d), name="w2"))) == b"echo:hi"
        refused = [
            grpc.insecure_channel(f"127.0.0.1:{port}"),  # plaintext
            _secure(port, creds=grpc.ssl_channel_credentials((d / "ca.crt").read_bytes())),  # no client cert
            _secure(
                port,
                creds=grpc.ssl_channel_credentials(  # another cluster's cert
                    (d / "ca.crt").read_bytes(),
                    (other / "worker.key").read_bytes(),
                    (other / "worker.crt").read_bytes(),
                ),
            ),
        ]
        for ch in refused:
            with pytest.raises(grpc.RpcError) as e:
                _call(ch)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_worker_cert_cannot_pose_as_master(certs):
    d, _ = certs
    fake = tls.TlsFiles(d / "worker.crt", d / "worker.key", d / "ca.crt")
    server, port = _echo_server(tls.server_credentials(fake))
    try:
        with pytest.raises(grpc.RpcError):
            _call(_secure(port, tls.tls_files("worker", certs_dir=str(d), name="w2")))
    finally:
        server.stop(0)


def test_tls_flags_need_all_three(tmp_path):
    assert tls.tls_files("worker") is None
    with pytest.raises(UserError, match="all three"):
        tls.tls_files("worker", cert="a.crt")
    with pytest.raises(UserError, match="not found"):
        tls.tls_files("master", certs_dir=str(tmp_path))


# ---------------------------------------------------------------- the handshake over real gRPC


def _join_server(token):
    from tpi_node.cluster.join_auth import MasterAuth
    from tpi_node.proto import tpi_pb2 as pb
    from tpi_node.proto import tpi_pb2_grpc as rpc

    class Servicer(rpc.MasterServicer):
        def __init__(self):
            self.auth = MasterAuth(token)

        def Challenge(self, request, context):
            return self.auth.challenge(request)

        def Join(self, request, context):
            why = self.auth.refusal(request)
            return pb.JoinReply(accepted=why is None, reason=why or "")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_MasterServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _join(port, token, node="w1", forge=False):
    from tpi_node.cluster.join_auth import prove_join
    from tpi_node.proto import tpi_pb2 as pb
    from tpi_node.proto import tpi_pb2_grpc as rpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = rpc.MasterStub(ch)
        req = pb.JoinRequest(node_id=node, version="0.1.0")
        if forge:  # a worker that skips the master check and guesses a proof
            reply = stub.Challenge(pb.ChallengeRequest(node_id=node, client_nonce=b"n" * 32))
            req.client_nonce, req.server_nonce, req.auth_proof = b"n" * 32, reply.server_nonce, b"p" * 32
        else:
            prove_join(stub, token, req)
        return stub.Join(req, timeout=5)


@pytest.mark.parametrize(
    "master_token,worker_token,expect",
    [
        (TOKEN, TOKEN, "accepted"),
        (None, None, "accepted"),
        (TOKEN, auth.new_token(), "master does not know"),
        (TOKEN, None, "needs a token"),
        (None, TOKEN, "no cluster token but this worker has one"),
    ],
)
def test_join_handshake_over_grpc(master_token, worker_token, expect):
    server, port = _join_server(master_token)
    try:
        if expect == "accepted":
            assert _join(port, worker_token).accepted
        else:
            with pytest.raises(auth.AuthError, match=expect):
                _join(port, worker_token)
    finally:
        server.stop(0)


def test_forged_proof_refused_over_grpc():
    server, port = _join_server(TOKEN)
    try:
        reply = _join(port, None, forge=True)
        assert not reply.accepted and reply.reason == "wrong cluster token"
    finally:
        server.stop(0)


# ---------------------------------------------------------------- tickets: the token guards more than Join


def test_stranger_cannot_fetch_weights_or_take_a_session(tmp_path, tiny_model_dir):
    """Status needs the token (`tpi-node status --master grpc://...` with it shows the table), and
    even a stranger who learns the plan digest and a node id gets neither the weights nor the
    worker's session stream: both need the ticket of an authenticated Join."""
    from tests.cluster_procs import Node, free_port, wait_health
    from tpi_node.cluster.join_auth import prove_status
    from tpi_node.proto import tpi_pb2 as pb
    from tpi_node.proto import tpi_pb2_grpc as rpc

    model = tiny_model_dir("tiny-llama3")
    http, port = free_port(), free_port()
    env = {"TPI_CLUSTER_TOKEN": TOKEN}
    master = Node(
        "master",
        tmp_path,
        ["serve", "--model", str(model), "--port", str(http), "--grpc-port", str(port), "--min-nodes", "2"],
        env=env,
    )
    worker = Node("worker", tmp_path, ["join", "--master", f"127.0.0.1:{port}"], env=env)
    try:
        wait_health(f"http://127.0.0.1:{http}", 2, 60, [master, worker])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = rpc.MasterStub(ch)
            with pytest.raises(grpc.RpcError) as e:  # no token, no status
                stub.Status(pb.StatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "needs its token" in e.value.details()
            with pytest.raises(auth.AuthError, match="master does not know"):  # nor with another token
                prove_status(stub, auth.new_token())
            status = stub.Status(prove_status(stub, TOKEN), timeout=5)
            victim = next(n for n in status.nodes if n.rank == 1)
            req = pb.ShardRequest(
                node_id=victim.node_id,
                plan_digest=status.plan_digest,
                rank=1,
                name="layer-000.safetensors",
                ticket=b"\0" * 32,
            )
            with pytest.raises(grpc.RpcError) as e:
                list(stub.FetchShard(req, timeout=5))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            hello = pb.WorkerMsg(hello=pb.Hello(node_id=victim.node_id, plan_digest=status.plan_digest, rank=1))
            replies = list(stub.Session(iter([hello]), timeout=5))
            assert replies and "did not show the ticket" in replies[0].shutdown.reason
            # the real worker still holds its session
            assert all(n.connected for n in stub.Status(prove_status(stub, TOKEN), timeout=5).nodes)
        cmd = [sys.executable, "-m", "tpi_node.cli", "status", "--master", f"grpc://127.0.0.1:{port}"]
        shown = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert shown.returncode == 0, shown.stderr[-1000:]
        assert "ready" in shown.stdout and victim.node_id in shown.stdout and "connected" in shown.stdout
        bare = {k: v for k, v in os.environ.items() if k != "TPI_CLUSTER_TOKEN"}
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=bare)
        assert refused.returncode == 2 and "needs a token" in refused.stderr, refused.stderr[-1000:]
        assert len(refused.stderr.strip().splitlines()) == 1
    finally:
        master.stop()
        worker.stop()
