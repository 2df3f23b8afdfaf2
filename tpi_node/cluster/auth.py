"""The cluster token and the join handshake that proves it without sending it.

A token is 32 random bytes written as `tpi1-<base32>`; every node of a cluster is given the same
one (`--token` or TPI_CLUSTER_TOKEN; `tpi-node token` makes one). At join both sides prove they
know it, HMAC-SHA256 over two fresh nonces:

    worker                                  master
      cn = 32 random bytes   -- node_id, cn -->
                                            sn = 32 random bytes (kept, single use, 60 s)
                             <-- sn, HMAC(k, "master" | id | cn | sn) --
      check the master's proof
      (a master without the token learns nothing and the worker refuses it)
                             -- HMAC(k, "worker" | id | cn | sn) -->
                                            check, constant time, sn used once

k = HMAC-SHA256("tpi-node cluster token v1", token): the token never crosses the wire, neither
proof can be replayed (fresh nonces on both sides), and a proof for one direction is useless in
the other (distinct labels). The same handshake admits a token holder to the Status RPC with
the label "status" instead of "worker", so a proof made for one purpose opens nothing else. The
proof guards admission; confidentiality of the traffic itself is TLS's job (tls.py).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import secrets
import threading
import time

from tpi_node.errors import UserError

TOKEN_PREFIX = "tpi1-"
NONCE_BYTES = 32
CHALLENGE_TTL_S = 60.0
MAX_PENDING = 1024  # bound the master's table of open challenges (a flood cannot grow it)
MAX_PENDING_PER_PEER = 4  # open challenges of one peer (connection); its oldest goes first
JOIN, STATUS = b"worker", b"status"  # what the caller's proof is for (its label)


class AuthError(Exception):
    """A peer failed the handshake; the message is one line, safe to show both sides."""


def new_token() -> str:
    return TOKEN_PREFIX + base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()


def check_token(token: str) -> str:
    """Accept any non-empty token of at least 16 characters (a user may pick a passphrase);
    refuse obviously weak ones with one line."""
    token = token.strip()
    if len(token) < 16:
        raise UserError("the cluster token is too short (at least 16 characters; `tpi-node token` makes a strong one)")
    return token


def resolve_token(token: str | None) -> str | None:
    """The cluster token as settings give it (--token or TPI_CLUSTER_TOKEN), checked; None (or
    an empty one) is an open cluster."""
    return check_token(token) if token else None


def _key(token: str) -> bytes:
    return hmac.new(b"tpi-node cluster token v1", token.encode(), hashlib.sha256).digest()


def _proof(key: bytes, label: bytes, node_id: str, cn: bytes, sn: bytes) -> bytes:
    msg = label + b"\0" + node_id.encode() + b"\0" + cn + sn
    return hmac.new(key, msg, hashlib.sha256).digest()


def _check_nonce(n: bytes, who: str) -> None:
    if not isinstance(n, bytes) or len(n) != NONCE_BYTES:
        raise AuthError(f"malformed {who} nonce")


class JoinVerifier:
    """The master's side: answers challenges and checks proofs. Thread safe."""

    def __init__(self, token: str) -> None:
        self._key = _key(token)
        # sn -> (node_id, cn, expiry, peer), oldest first; and each peer's open nonces, oldest first
        self._pending: dict[bytes, tuple[str, bytes, float, str]] = {}
        self._by_peer: dict[str, collections.deque[bytes]] = {}
        self._lock = threading.Lock()

    def challenge(self, node_id: str, client_nonce: bytes, peer: str = "") -> tuple[bytes, bytes]:
        """-> (server nonce, master's proof) for a worker that sent `client_nonce` from `peer`.
        The open challenges are bounded per peer and overall, and a full table makes room by
        dropping the oldest challenge of the peer that holds the most: a flood from one peer only
        ever evicts its own, never another worker's."""
        _check_nonce(client_nonce, "client")
        sn = secrets.token_bytes(NONCE_BYTES)
        now = time.monotonic()
        with self._lock:
            while self._pending:  # expired ones first (the dict is in issue order)
                oldest = next(iter(self._pending))
                if self._pending[oldest][2] >= now:
                    break
                self._drop(oldest)
            mine = self._by_peer.get(peer)
            if mine and len(mine) >= MAX_PENDING_PER_PEER:
                self._drop(mine[0])
            elif len(self._pending) >= MAX_PENDING:
                greedy = max(self._by_peer.values(), key=len)
                self._drop(greedy[0])
            self._pending[sn] = (node_id, client_nonce, now + CHALLENGE_TTL_S, peer)
            self._by_peer.setdefault(peer, collections.deque()).append(sn)
        return sn, _proof(self._key, b"master", node_id, client_nonce, sn)

    def _drop(self, sn: bytes) -> tuple[str, bytes, float, str] | None:
        """Caller holds the lock."""
        entry = self._pending.pop(sn, None)
        if entry is not None:
            mine = self._by_peer[entry[3]]
            mine.remove(sn)
            if not mine:
                del self._by_peer[entry[3]]
        return entry

    def open_challenges(self, peer: str | None = None) -> int:
        with self._lock:
            return len(self._pending) if peer is None else len(self._by_peer.get(peer, ()))

    def verify(
        self, node_id: str, client_nonce: bytes, server_nonce: bytes, proof: bytes, purpose: bytes = JOIN
    ) -> None:
        """Raise AuthError unless `proof` is the caller's proof, for `purpose` (JOIN or STATUS), of
        a challenge this verifier issued to `node_id` (each challenge answers once)."""
        with self._lock:
            entry = self._drop(server_nonce) if isinstance(server_nonce, bytes) else None
        if entry is None:
            raise AuthError("no open join challenge for this worker (expired or replayed); join again")
        nid, cn, expiry, _ = entry
        if nid != node_id or not hmac.compare_digest(cn, client_nonce) or expiry < time.monotonic():
            raise AuthError("the join challenge does not match this worker; join again")
        want = _proof(self._key, purpose, node_id, client_nonce, server_nonce)
        if not isinstance(proof, bytes) or not hmac.compare_digest(want, proof):
            raise AuthError("wrong cluster token")


class JoinProver:
    """The caller's side (a worker's join, or a token holder's Status call): one instance per
    attempt."""

    def __init__(self, token: str, node_id: str, purpose: bytes = JOIN) -> None:
        self._key = _key(token)
        self.node_id, self.purpose = node_id, purpose
        self.client_nonce = secrets.token_bytes(NONCE_BYTES)

    def answer(self, server_nonce: bytes, master_proof: bytes) -> bytes:
        """Check the master's proof, then -> this worker's proof. AuthError when the master does
        not know the token (a stranger's master must not get this worker)."""
        _check_nonce(server_nonce, "server")
        want = _proof(self._key, b"master", self.node_id, self.client_nonce, server_nonce)
        if not isinstance(master_proof, bytes) or not hmac.compare_digest(want, master_proof):
            raise AuthError("the master does not know this cluster's token (wrong token, or not our master)")
        return _proof(self._key, self.purpose, self.node_id, self.client_nonce, server_nonce)
