"""The token handshake (auth.py) on the wire: a `Challenge` RPC, then `Join` carrying the proof.

    worker: Challenge(node_id, client_nonce) -> (required, server_nonce, master_proof)
            Join(..., client_nonce, server_nonce, auth_proof)
The master without a token answers `required = false` (an open cluster) and ignores proofs; a
worker with a token refuses such a master (it cannot prove anything), a worker without a token
is refused by a master with one. Messages are one line, shown on both sides.

Status (node addresses, the plan) is the cluster's business too: with a token, the master answers
it only to a worker showing its join ticket, or to a caller that ran the same handshake for it
(`prove_status`: Challenge, then Status carrying a proof labelled "status").
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading

from tpi_node.cluster.auth import STATUS, AuthError, JoinProver, JoinVerifier
from tpi_node.proto import tpi_pb2 as pb

log = logging.getLogger("tpi_node.auth")


class Tickets:
    """One random ticket per accepted join (JoinReply.ticket): FetchShard and Session are only
    served to the holder, so the token guards the weights and the session stream too, not just
    Join (a stranger who learns a plan digest and a node id cannot fetch or hijack)."""

    def __init__(self) -> None:
        self._by_node: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def issue(self, node_id: str) -> bytes:
        t = secrets.token_bytes(32)
        with self._lock:
            self._by_node[node_id] = t
        return t

    def check(self, node_id: str, ticket: bytes) -> bool:
        with self._lock:
            want = self._by_node.get(node_id)
        return want is not None and isinstance(ticket, bytes) and hmac.compare_digest(want, ticket)


class MasterAuth:
    """The master's side; `token` None = open cluster."""

    def __init__(self, token: str | None) -> None:
        self.tickets = Tickets()
        self.verifier = JoinVerifier(token) if token else None
        if token is None:
            log.warning(
                "no cluster token: any machine that reaches this master can join "
                "(make one with `tpi-node token`, then --token or TPI_CLUSTER_TOKEN on every node)"
            )

    def challenge(self, request, peer: str = ""):
        """Answer a Challenge RPC from `peer` (gRPC's peer string: one connection)."""
        if self.verifier is None:
            return pb.ChallengeReply(required=False)
        if not request.client_nonce:  # a worker without a token: it will be told it needs one
            return pb.ChallengeReply(required=True)
        try:
            sn, proof = self.verifier.challenge(request.node_id, bytes(request.client_nonce), peer)
        except AuthError as e:
            return pb.ChallengeReply(required=True, reason=str(e))
        return pb.ChallengeReply(required=True, server_nonce=sn, master_proof=proof)

    def refusal(self, request) -> str | None:
        """Why a JoinRequest must be refused, or None when its proof is good (or not needed)."""
        if self.verifier is None:
            return None
        if not request.auth_proof:
            return "this cluster needs a token: give --token or TPI_CLUSTER_TOKEN"
        try:
            self.verifier.verify(
                request.node_id, bytes(request.client_nonce), bytes(request.server_nonce), bytes(request.auth_proof)
            )
        except AuthError as e:
            log.warning("refused node %s: %s", request.node_id, e)
            return str(e)
        return None

    def status_refusal(self, request) -> str | None:
        """Why a StatusRequest must be refused, or None: an open cluster answers anyone; with a
        token, a node's join ticket or a fresh proof for STATUS is needed."""
        if self.verifier is None:
            return None
        if request.ticket:
            ok = self.tickets.check(request.node_id, bytes(request.ticket))
            return None if ok else "no valid join ticket for this node; join again, or give the cluster token"
        if not request.auth_proof:
            return "this cluster's status needs its token: give --token or TPI_CLUSTER_TOKEN"
        try:
            self.verifier.verify(
                request.node_id,
                bytes(request.client_nonce),
                bytes(request.server_nonce),
                bytes(request.auth_proof),
                STATUS,
            )
        except AuthError as e:
            log.warning("refused a status request (%s): %s", request.node_id, e)
            return str(e)
        return None


def _answer(prover: JoinProver | None, reply, request) -> None:
    """Check the master's challenge reply and put the proof into `request` (a JoinRequest)."""
    if reply.reason:
        raise AuthError(reply.reason)
    if not reply.required:
        if prover is not None:
            raise AuthError(
                "the master has no cluster token but this worker has one: refusing to join "
                "an open cluster (give the master the same --token, or drop it here)"
            )
        return
    if prover is None:
        raise AuthError("this cluster needs a token: give --token or TPI_CLUSTER_TOKEN")
    request.auth_proof = prover.answer(bytes(reply.server_nonce), bytes(reply.master_proof))
    request.client_nonce = prover.client_nonce
    request.server_nonce = bytes(reply.server_nonce)


def prove_join(stub, token: str | None, request, timeout: float = 10.0) -> None:
    """Run the handshake with a sync stub; fills `request`'s auth fields. Raises AuthError."""
    prover = JoinProver(token, request.node_id) if token else None
    nonce = prover.client_nonce if prover else b""
    reply = stub.Challenge(pb.ChallengeRequest(node_id=request.node_id, client_nonce=nonce), timeout=timeout)
    _answer(prover, reply, request)


async def prove_join_async(stub, token: str | None, request, timeout: float = 10.0) -> None:
    """prove_join for a grpc.aio stub."""
    prover = JoinProver(token, request.node_id) if token else None
    nonce = prover.client_nonce if prover else b""
    reply = await stub.Challenge(pb.ChallengeRequest(node_id=request.node_id, client_nonce=nonce), timeout=timeout)
    _answer(prover, reply, request)


def prove_status(stub, token: str | None, caller: str = "status", timeout: float = 10.0):
    """A StatusRequest for a sync stub: with a token, the handshake for STATUS is run first (the
    master must prove the token too). Raises AuthError."""
    request = pb.StatusRequest(node_id=caller)
    prover = JoinProver(token, caller, STATUS) if token else None
    nonce = prover.client_nonce if prover else b""
    reply = stub.Challenge(pb.ChallengeRequest(node_id=caller, client_nonce=nonce), timeout=timeout)
    if prover is not None and not reply.required and not reply.reason:
        raise AuthError("this master has no cluster token (an open cluster) but a token was given: not our master?")
    _answer(prover, reply, request)
    return request
