"""The Status RPC from outside the plan: what `tpi-node status --master grpc://HOST[:PORT]` asks.

The master's gRPC port is the one the workers reach (its HTTP port may listen on loopback only),
and it answers Status only to a holder of the cluster token when it has one: the call runs the
token handshake first (join_auth.prove_status), over mutual TLS when given the cluster's files.

    state = read_status("10.0.0.5:50051", token, tls)   # the dict `tpi-node status` prints
"""

from __future__ import annotations

import grpc

from tpi_node.cluster.auth import AuthError
from tpi_node.cluster.channels import CHANNEL_OPTIONS
from tpi_node.cluster.join_auth import prove_status
from tpi_node.cluster.tls import TLS_CHANNEL_OPTIONS, TlsFiles, channel_credentials
from tpi_node.errors import UserError
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.proto import tpi_pb2_grpc as rpc


def read_status(address: str, token: str | None, tls: TlsFiles | None, timeout: float = 10.0) -> dict:
    """host:port -> the cluster state (the keys of /cluster.json that Status carries). UserError,
    one line, when the master cannot be reached or refuses."""
    if tls is not None:
        channel = grpc.secure_channel(address, channel_credentials(tls), options=CHANNEL_OPTIONS + TLS_CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    with channel:
        stub = rpc.MasterStub(channel)
        try:
            reply = stub.Status(prove_status(stub, token, timeout=timeout), timeout=timeout)
        except AuthError as e:
            raise UserError(f"the master at {address} refused the status request: {e}") from None
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise UserError(f"the master at {address} refused the status request: {e.details()}") from None
            hint = "" if tls is not None else " (if the master uses TLS, give --certs DIR)"
            raise UserError(f"cannot read the status of the master at {address}: {e.code().name}{hint}") from None
    return state_of(reply)


def state_of(reply: pb.StatusReply) -> dict:
    planned = bool(reply.plan_digest)
    nodes = []
    for n in reply.nodes:
        master = (n.rank == 0) if planned else n.address == "master"  # before the plan: how it joined
        row = {"id": n.node_id, "role": "master" if master else "worker", "address": n.address}
        row["state"] = "connected" if n.connected else "lost"
        if planned:
            row |= {"rank": n.rank, "kv": [n.kv_start, n.kv_end], "ffn": [n.ffn_start, n.ffn_end]}
        nodes.append(row)
    return {
        "ready": reply.ready,
        "version": reply.version,
        "model": reply.model_digest[:12],
        "plan": {"digest": reply.plan_digest} if planned else None,
        "expected_nodes": reply.expected_nodes,
        "nodes": nodes,
    }
