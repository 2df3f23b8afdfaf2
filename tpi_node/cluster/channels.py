"""gRPC channels and server ports of the cluster, with or without mutual TLS (cluster/tls.py)."""

from __future__ import annotations

import grpc

from tpi_node.cluster.tls import TLS_CHANNEL_OPTIONS, TlsFiles, channel_credentials, server_credentials
from tpi_node.errors import UserError

# Frames up to 1 GiB (a long prefill's hidden states); keepalive so a silent peer is noticed.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.min_time_between_pings_ms", 1000),
]
# A worker may dial before the master listens: retry fast, and never share a subchannel that is
# backing off with a later channel of the same process.
DIAL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=CHANNEL_OPTIONS)


def listen(server: grpc.aio.Server, address: str, tls: TlsFiles | None) -> int:
    """Add a port to `server` (host:port, port 0 = any) -> the bound port; UserError when it cannot."""
    if tls is not None:
        port = server.add_secure_port(address, server_credentials(tls))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise UserError(f"cannot listen for workers on {address}")
    return port


def dial(address: str, tls: TlsFiles | None) -> grpc.aio.Channel:
    if tls is not None:
        return grpc.aio.secure_channel(address, channel_credentials(tls), options=DIAL_OPTIONS + TLS_CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=DIAL_OPTIONS)
