#!/bin/sh
# Container entry point: shape this node's link, then run the command (tpi-node serve | join).
#   LINK_RATE        e.g. 300mbit: tc tbf on eth0 (this node's upload; every node shapes its own)
#   LINK_LATENCY_MS  e.g. 1: TCP arriving on eth0 passes the delay relay (tpi_node.testbed.relay),
#                    which delays each direction by this much: the one-way node-to-node latency
# Both need the NET_ADMIN capability; without it the node runs unshaped and says so.
set -e
RELAY_PORT=15001
if [ -n "${LINK_RATE:-}" ] && [ "$LINK_RATE" != "none" ]; then
    if tc qdisc replace dev eth0 root tbf rate "$LINK_RATE" burst 64kb latency 50ms 2>/tmp/tc.err; then
        echo "tpi-entrypoint: eth0 shaped to $LINK_RATE" >&2
    else
        echo "tpi-entrypoint: warning: cannot shape eth0 ($(cat /tmp/tc.err)); add cap_add: [NET_ADMIN]" >&2
    fi
fi
if [ -n "${LINK_LATENCY_MS:-}" ] && [ "$LINK_LATENCY_MS" != "0" ]; then
    python -m tpi_node.testbed.relay --port "$RELAY_PORT" --delay-ms "$LINK_LATENCY_MS" \
        > /tmp/relay.log 2>&1 &
    python - "$RELAY_PORT" <<'PY'
import socket, sys, time
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.2).close()
        break
    except OSError:
        time.sleep(0.05)
PY
    if python -c "from tpi_node.testbed.relay import nft_redirect_rules as r; print(r('tpi_testbed', 'eth0', $RELAY_PORT))" \
        | nft -f - 2>/tmp/nft.err; then
        echo "tpi-entrypoint: eth0 latency ${LINK_LATENCY_MS} ms (delay relay)" >&2
    else
        echo "tpi-entrypoint: warning: no latency emulation ($(cat /tmp/nft.err)); add cap_add: [NET_ADMIN]" >&2
    fi
fi
exec "$@"
