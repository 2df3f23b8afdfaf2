"""Node ids: stable on one machine, different on every machine.

exo's most-reported bug is two machines with the same node id after a config folder (or a VM
image) was copied. Here the id is random, but stored together with the fingerprint of the machine
it was made on (/etc/machine-id, else the host name): a copied file on another machine no longer
matches its fingerprint and a fresh id is made there. The id reads `<host>-<8 hex>` so logs and
`tpi-node status` say which machine a node is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import socket
from pathlib import Path

from tpi_node.paths import tpi_home

log = logging.getLogger("tpi_node.identity")

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
ID_FILE = "node-id.json"


def machine_fingerprint() -> str:
    """A sha256 (hex, 16 chars) naming this machine: its machine-id when it has one, else the host
    name. Hashed so the file never discloses the machine-id itself."""
    raw = ""
    for f in MACHINE_ID_FILES:
        try:
            raw = Path(f).read_text().strip()
        except OSError:
            continue
        if raw:
            break
    raw = raw or "host:" + socket.gethostname()
    return hashlib.sha256(("tpi-node machine " + raw).encode()).hexdigest()[:16]


def _host_label() -> str:
    """The host name cut to a DNS-label-safe prefix (ids appear in mDNS names)."""
    h = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return (h or "node")[:24]


def new_node_id() -> str:
    return f"{_host_label()}-{secrets.token_hex(4)}"


def node_id(home: Path | None = None, role: str = "node") -> str:
    """This machine's id for `role` (a master and a worker on one machine are two nodes, so each
    role has its own id). Made once and kept in <home>/node-id.json; remade when the file was
    made on another machine (copied config) or cannot be read."""
    path = (home or tpi_home()) / ID_FILE
    fp = machine_fingerprint()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    if data.get("machine") != fp:
        if data:
            log.warning("%s was made on another machine: making new node ids for this one", path)
        data = {"machine": fp, "ids": {}}
    ids = data.setdefault("ids", {})
    nid = ids.get(role)
    if not isinstance(nid, str) or not re.fullmatch(r"[a-z0-9-]{1,40}", nid):
        nid = ids[role] = new_node_id()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
        except OSError as e:  # read-only home: still a valid id, just not a stable one
            log.warning("cannot store the node id in %s (%s); it will change on restart", path, e)
    return nid


_CLAIMS: list = []  # the lock files of the ids this process holds (open for its whole life)


def claim(nid: str, home: Path | None = None) -> str:
    """`nid`, or `nid-2`, `nid-3`, ...: the first id no other tpi-node process of this machine (and
    home) holds. Two `tpi-node join` started on one machine would otherwise present the same id,
    and the master would take the second for the first rejoining. Held by a flock, which the
    kernel drops when the process ends (a restarted node gets its id back)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no claim, the master still refuses a duplicate
        return nid
    locks = (home or tpi_home()) / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError:
        return nid
    for i in range(1, 100):
        cand = nid if i == 1 else f"{nid}-{i}"
        f = open(locks / f"{cand}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _CLAIMS.append(f)
        if i > 1:
            log.warning(
                "node id %s is held by another tpi-node process on this machine: this one is %s "
                "(--node-id or its own TPI_HOME to choose)",
                nid,
                cand,
            )
        return cand
    return nid
