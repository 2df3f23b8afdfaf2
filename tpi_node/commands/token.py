"""`tpi-node token`: make a new cluster token."""

from __future__ import annotations

import sys

from tpi_node.cluster.auth import new_token
from tpi_node.settings import TokenSettings


def run(s: TokenSettings) -> int:
    print(new_token())
    print("give every node of the cluster this token: --token TOKEN or TPI_CLUSTER_TOKEN=TOKEN", file=sys.stderr)
    return 0
