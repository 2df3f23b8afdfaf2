"""`tpi-node certs`: a cluster CA and node certificates for mutual TLS."""

from __future__ import annotations

import sys
from pathlib import Path

from tpi_node.cluster.tls import make_cluster_certs
from tpi_node.paths import certs_dir
from tpi_node.settings import CertsSettings


def run(s: CertsSettings) -> int:
    out = Path(s.out).expanduser() if s.out else certs_dir()
    made = make_cluster_certs(out, tuple(s.worker_certs or ["worker"]), tuple(s.cert_hosts), s.cluster)
    for f in made:
        print(f)
    print(
        f"copy ca.crt and a node's .crt/.key to each node; serve/join with --certs DIR or "
        f"--tls-cert/--tls-key/--tls-ca. Keep {out / 'ca.key'} off the nodes.",
        file=sys.stderr,
    )
    return 0
