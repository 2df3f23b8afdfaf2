"""Finding the cluster on the local network with mDNS / DNS-SD (zeroconf).

Every node advertises one `_tpi-node._tcp.local.` service named after its node id, with TXT
records: cluster name, role (master | worker), version, node id, and for the master its gRPC and
HTTP ports, for a worker its capacity (memory, cores, disk). `tpi-node join` without --master
browses for the master of its cluster (`find_master`); `serve --auto-admit` watches the workers
(`WorkerBrowser`). mDNS only crosses one network segment (multicast to 224.0.0.251, UDP 5353).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import time
from dataclasses import dataclass, field

from tpi_node.errors import UserError

log = logging.getLogger("tpi_node.discovery")

SERVICE_TYPE = "_tpi-node._tcp.local."
MAX_TXT_VALUE = 200  # bytes; a stranger's records are bounded before use


class DiscoveryError(UserError):
    """No usable master was found; the message says what was found instead and why."""


@dataclass(frozen=True)
class Peer:
    """One advertised node as seen by a browser."""

    name: str  # the mDNS instance name
    node_id: str
    role: str
    cluster: str
    version: str
    addresses: tuple[str, ...]
    port: int  # gRPC port (master) or 0
    http_port: int = 0
    props: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def address(self) -> str:
        return pick_address(self.addresses)

    def describe(self) -> str:
        where = f"{self.address}:{self.port}" if self.port else self.address
        return f"{self.role} '{self.node_id}' of cluster '{self.cluster}' at {where} (v{self.version})"


# ---------------------------------------------------------------- addresses


def _local_networks() -> list[ipaddress.IPv4Network]:
    import ifaddr

    nets = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                try:
                    nets.append(ipaddress.ip_network(f"{ip.ip}/{ip.network_prefix}", strict=False))
                except ValueError:
                    pass
    return nets


def local_addresses() -> list[str]:
    """This host's IPv4 addresses worth advertising: non-loopback ones, else loopback."""
    import ifaddr

    addrs = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.") and not ip.ip.startswith("169.254."):
                addrs.append(ip.ip)
    return addrs or ["127.0.0.1"]


def pick_address(addresses: tuple[str, ...] | list[str]) -> str:
    """The address to dial: one on a network this host shares, else the first non-loopback one
    (a master with docker0 and a LAN address must be dialled on the LAN)."""
    if not addresses:
        return ""
    nets = _local_networks()
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if not ip.is_loopback and any(ip in n for n in nets if n.prefixlen < 32):
            return a
    non_lo = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    return (non_lo or list(addresses))[0]


# ---------------------------------------------------------------- advertising


def _txt(props: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in props.items() if v is not None}


class Advertisement:
    """This node's mDNS record, registered until close()."""

    def __init__(
        self,
        role: str,
        cluster: str,
        node_id: str,
        version: str,
        port: int = 0,
        http_port: int = 0,
        extra: dict | None = None,
        addresses: list[str] | None = None,
    ) -> None:
        from zeroconf import IPVersion, ServiceInfo, Zeroconf

        self.addresses = addresses or local_addresses()
        props = {
            "cluster": cluster,
            "role": role,
            "version": version,
            "id": node_id,
            "grpc": port or None,
            "http": http_port or None,
            **(extra or {}),
        }
        host = socket.gethostname().split(".")[0] or "tpi-node"
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{node_id}.{SERVICE_TYPE}",
            port=port,
            properties=_txt(props),
            addresses=[socket.inet_aton(a) for a in self.addresses],
            server=f"{host}-{node_id}.local.",
        )
        self._zc = Zeroconf(ip_version=IPVersion.V4Only)
        # allow_name_change: a stale record of our own id (a crash a moment ago) must not block us
        self._zc.register_service(self.info, allow_name_change=True)
        log.info("advertising %s '%s' of cluster '%s' on %s (mDNS)", role, node_id, cluster, ", ".join(self.addresses))

    def close(self) -> None:
        try:
            self._zc.unregister_service(self.info)
        finally:
            self._zc.close()

    def __enter__(self) -> Advertisement:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def advertise_master(cluster: str, node_id: str, version: str, grpc_port: int, http_port: int, **kw) -> Advertisement:
    return Advertisement("master", cluster, node_id, version, grpc_port, http_port, **kw)


def advertise_worker(
    cluster: str, node_id: str, version: str, memory_bytes: int, cores: int, disk_bytes: int = 0, **kw
) -> Advertisement:
    extra = {"memory": memory_bytes, "cores": cores, "disk": disk_bytes or None}
    return Advertisement("worker", cluster, node_id, version, extra=extra, **kw)


# ---------------------------------------------------------------- browsing


def _peer_from_info(info) -> Peer | None:
    """A Peer from a resolved ServiceInfo, or None when its records are not a tpi-node's."""
    props = {}
    for k, v in (info.properties or {}).items():
        if k is None or v is None or len(v) > MAX_TXT_VALUE:
            continue
        props[k.decode(errors="replace")] = v.decode(errors="replace")
    role = props.get("role")
    if role not in ("master", "worker") or not props.get("id"):
        return None

    def port(key: str) -> int:
        try:
            p = int(props.get(key, 0))
        except ValueError:
            return 0
        return p if 0 < p < 65536 else 0

    return Peer(
        name=info.name,
        node_id=props["id"],
        role=role,
        cluster=props.get("cluster", ""),
        version=props.get("version", "?"),
        addresses=tuple(info.parsed_addresses()),
        port=port("grpc"),
        http_port=port("http"),
        props=props,
    )


class Browser:
    """Watches every tpi-node service on the segment; `peers()` is the current view. A zeroconf
    thread adds names to a queue; resolution happens in `poll`, on the caller's thread."""

    def __init__(self) -> None:
        from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

        self._zc = Zeroconf(ip_version=IPVersion.V4Only)
        self._changes: queue.Queue = queue.Queue()
        self._peers: dict[str, Peer] = {}
        removed = ServiceStateChange.Removed

        def on_change(zeroconf, service_type, name, state_change):
            self._changes.put((name, state_change is removed))

        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[on_change])

    def poll(self, wait: float = 0.0) -> dict[str, Peer]:
        """Resolve the names seen so far (waiting up to `wait` s for the first change)."""
        from zeroconf import ServiceInfo

        deadline = time.monotonic() + wait
        while True:
            try:
                name, gone = self._changes.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return dict(self._peers)
            if gone:
                self._peers.pop(name, None)
                continue
            info = ServiceInfo(SERVICE_TYPE, name)
            if info.request(self._zc, 1500):
                peer = _peer_from_info(info)
                if peer is not None:
                    self._peers[name] = peer
            deadline = time.monotonic()  # after the first change: drain without waiting

    def peers(self) -> list[Peer]:
        return list(self.poll().values())

    def close(self) -> None:
        self._browser.cancel()
        self._zc.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerBrowser(Browser):
    """The master's view of the workers of its cluster on the segment (for `serve --auto-admit`)."""

    def __init__(self, cluster: str) -> None:
        super().__init__()
        self.cluster = cluster

    def workers(self) -> list[Peer]:
        return [p for p in self.peers() if p.role == "worker" and p.cluster == self.cluster]


class WorkerWatch:
    """A WorkerBrowser on its own thread (resolving can block for a second): `.workers` is the
    latest list of this cluster's advertised workers, for the master's `--auto-admit` view."""

    def __init__(self, cluster: str, every_s: float = 1.0) -> None:
        import threading

        self.workers: list[Peer] = []
        self._stop = threading.Event()
        self._browser = WorkerBrowser(cluster)
        self._thread = threading.Thread(target=self._run, args=(every_s,), name="tpi-mdns-workers", daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        known: set[str] = set()
        while not self._stop.is_set():
            self.workers = self._browser.workers()
            for w in self.workers:
                if w.node_id not in known:
                    known.add(w.node_id)
                    log.info("discovered %s", w.describe())
            self._stop.wait(every_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._browser.close()


def find_master(cluster: str = "default", timeout: float = 5.0, version: str | None = None) -> Peer:
    """The master of `cluster` on this network segment. Raises DiscoveryError saying what was
    found instead (masters of other clusters or versions, two masters) or that nothing answered."""
    deadline = time.monotonic() + timeout
    with Browser() as b:
        found: dict[str, Peer] = {}
        first_match = None
        while time.monotonic() < deadline:
            found = b.poll(wait=min(0.2, max(0.0, deadline - time.monotonic())))
            ours = [
                p
                for p in found.values()
                if p.role == "master" and p.cluster == cluster and (version is None or p.version == version)
            ]
            if ours and first_match is None:
                first_match = time.monotonic()
            # after the first answer, listen a moment longer: two masters would be ambiguous
            if first_match is not None and time.monotonic() - first_match > 0.5:
                break
    masters = [p for p in found.values() if p.role == "master"]
    ours = [p for p in masters if p.cluster == cluster and (version is None or p.version == version)]
    if len(ours) == 1:
        return ours[0]
    if len(ours) > 1:
        raise DiscoveryError(
            f"found {len(ours)} masters of cluster '{cluster}': "
            + "; ".join(p.describe() for p in ours)
            + ". Give --master HOST[:PORT]"
        )
    if masters:
        hint = (
            "; wrong version: upgrade one side"
            if any(p.cluster == cluster for p in masters)
            else "; join another cluster with --cluster NAME"
        )
        raise DiscoveryError(
            f"no master of cluster '{cluster}'"
            + (f" with version {version}" if version else "")
            + " found in "
            + f"{timeout:g} s; found: "
            + "; ".join(p.describe() for p in masters)
            + hint
            + ", or give --master HOST[:PORT]"
        )
    others = f" (saw {len(found)} worker(s), no master)" if found else ""
    raise DiscoveryError(
        f"no tpi-node master answered on this network in {timeout:g} s{others}. "
        "Is the master running (`tpi-node serve`) on the same network segment, and "
        "is UDP port 5353 (mDNS) open in both firewalls? Or give --master HOST[:PORT]"
    )
