"""The namespace testbed: N emulated machines on one Linux box (needs root).

    host (root namespace)                      node i (namespace <name>-n<i>, hostname <name>-n<i>)
    bridge <name>-br 10.231.7.1/24  <-veth->   eth0 10.231.7.(10+i)/24
                                               tc tbf on both ends of the veth (link rate, each way)
                                               nft: TCP arriving on eth0 -> delay relay -> the service
                                               memory cgroup <own>/<name>/n<i>, cpu cgroup likewise

Only the bridge and the namespaces carry the testbed's private /24, and the namespaces have no
default route: their traffic stays between the nodes (and the host's bridge address, so a client
on the host can reach a node). IPv6 is off inside so nothing bypasses the IPv4 delay relay; the
multicast route and a bridge without IGMP snooping let mDNS cross between nodes.

State (relay pids, cgroup paths, the spec) lives in /run/tpi-testbed/<name>/; `down` also sweeps
everything named after the testbed, so it cleans up after a crash of `up` too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tpi_node.errors import UserError
from tpi_node.testbed.presets import TestbedSpec
from tpi_node.testbed.relay import nft_redirect_rules

STATE_ROOT = Path("/run/tpi-testbed")
CGROUP_ROOT = Path("/sys/fs/cgroup")
RELAY_PORT = 15001
NFT_TABLE = "tpi_testbed"


def run(*argv: str, check: bool = True, quiet: bool = False, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise UserError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:] or ['?']}"[:400])
    return r


def _own_cgroup(controller: str) -> Path | None:
    """This process's cgroup v1 directory for `controller` (None when that hierarchy is absent)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            base = CGROUP_ROOT / ctrls
            if not base.is_dir():
                base = CGROUP_ROOT / controller
            d = base / path.lstrip("/")
            return d if d.is_dir() else None
    return None


def check_host() -> None:
    """Raise UserError saying what is missing for a namespace testbed on this machine."""
    if os.geteuid() != 0:
        raise UserError("the namespace testbed needs root (network namespaces, tc, cgroups)")
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables"), ("unshare", "util-linux")):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            raise UserError(f"'{tool}' is missing (apt-get install {pkg})")
    r = subprocess.run(["ip", "netns", "add", "tpi-probe"], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"cannot create network namespaces here: {r.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "tpi-probe"], capture_output=True)


@dataclasses.dataclass
class Node:
    index: int
    name: str  # namespace and hostname, e.g. tpitb-n0
    ip: str
    host_veth: str  # the bridge end of the link
    memcg: str | None  # cgroup directories
    cpucg: str | None


class Testbed:
    def __init__(self, name: str = "tpitb", subnet: str = "10.231.7.0/24") -> None:
        if not name.isalnum() or len(name) > 8:
            raise UserError(f"testbed name must be 1-8 letters/digits, got '{name}'")
        self.name = name
        try:
            self.net = ipaddress.ip_network(subnet)
        except ValueError as e:
            raise UserError(f"bad subnet '{subnet}': {e}") from None
        if self.net.version != 4 or self.net.num_addresses < 256:
            raise UserError(f"the subnet must be an IPv4 /24 or larger, got {subnet}")
        self.state_dir = STATE_ROOT / name
        self.bridge = f"{name}-br"

    # ------------------------------------------------------------------ layout
    def node(self, i: int) -> Node:
        mem, cpu = _own_cgroup("memory"), _own_cgroup("cpu")
        return Node(
            i,
            f"{self.name}-n{i}",
            str(self.net.network_address + 10 + i),
            f"{self.name}-v{i}",
            str(mem / self.name / f"n{i}") if mem else None,
            str(cpu / self.name / f"n{i}") if cpu else None,
        )

    @property
    def bridge_ip(self) -> str:
        return str(self.net.network_address + 1)

    def spec(self) -> TestbedSpec | None:
        f = self.state_dir / "state.json"
        if not f.is_file():
            return None
        return TestbedSpec(**json.loads(f.read_text())["spec"])

    def nodes(self) -> list[Node]:
        spec = self.spec()
        if spec is None:
            raise UserError(f"testbed '{self.name}' is not up (scripts/testbed up)")
        return [self.node(i) for i in range(spec.nodes)]

    def resolve(self, node: str) -> Node:
        """'n1', '1', 'tpitb-n1' or an IP -> Node."""
        for n in self.nodes():
            if node in (n.name, f"n{n.index}", str(n.index), n.ip):
                return n
        raise UserError(f"no node '{node}' in testbed '{self.name}' (nodes: n0..n{len(self.nodes()) - 1})")

    # ------------------------------------------------------------------ up / down
    def up(self, spec: TestbedSpec, relay: bool | None = None) -> list[Node]:
        """Build the testbed; idempotent (an existing one is taken down first). On any failure or
        interrupt everything built so far is removed again. relay=True puts the delay relay in
        front of every node even at 0 ms, so `set_link` can change the latency of connections
        that are already open (default: a relay only when the latency is above 0)."""
        relay = spec.latency_ms > 0 if relay is None else relay
        check_host()
        self.down(quiet=True)
        self._check_subnet_free()
        prev = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
        for s in prev:
            signal.signal(s, _raise_interrupt)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._write_state(spec, relays={})
            run("ip", "link", "add", self.bridge, "type", "bridge")
            # mDNS: flood multicast to every port instead of waiting for IGMP joins.
            run("ip", "link", "set", self.bridge, "type", "bridge", "mcast_snooping", "0")
            run("ip", "addr", "add", f"{self.bridge_ip}/{self.net.prefixlen}", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            self._allow_forwarding()
            nodes = [self.node(i) for i in range(spec.nodes)]
            for n in nodes:
                self._add_node(n, spec)
            relays = {n.name: self._start_relay(n, spec.latency_ms) for n in nodes} if relay else {}
            self._write_state(spec, relays)
            return nodes
        except BaseException:
            self.down(quiet=True)
            raise
        finally:
            for s, h in prev.items():
                signal.signal(s, h)

    def _forward_rule(self, op: str) -> list[str]:
        return ["iptables", op, "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]

    def _allow_forwarding(self) -> None:
        """With br_netfilter loaded (Docker loads it), bridged packets pass the host's iptables
        FORWARD chain, whose policy Docker sets to DROP: let node-to-node traffic through."""
        if shutil.which("iptables"):
            run(*self._forward_rule("-I"))

    def _check_subnet_free(self) -> None:
        for line in run("ip", "-4", "-o", "addr", "show").stdout.splitlines():
            addr = ipaddress.ip_interface(line.split()[3])
            if addr.network.overlaps(self.net):
                raise UserError(
                    f"{self.net} is already used on this machine ({line.split()[1]} {addr}); pick another with --subnet"
                )

    def _add_node(self, n: Node, spec: TestbedSpec) -> None:
        ns = n.name
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", n.host_veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "link", "set", n.host_veth, "master", self.bridge, "up")
        nsx = ("ip", "netns", "exec", ns)
        run(*nsx, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=False)
        run("ip", "-n", ns, "addr", "add", f"{n.ip}/{self.net.prefixlen}", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        self._shape(n, spec.rate_bps)
        for cg in (n.memcg, n.cpucg):
            if cg:
                Path(cg).mkdir(parents=True, exist_ok=True)
        if n.memcg:
            mem = Path(n.memcg)
            (mem / "memory.limit_in_bytes").write_text(str(spec.memory_bytes or -1))
            if (mem / "memory.swappiness").exists():
                (mem / "memory.swappiness").write_text("0")
        if n.cpucg:
            quota = int(spec.cpus * 100_000) if spec.cpus and spec.cpus < os.cpu_count() else -1
            (Path(n.cpucg) / "cpu.cfs_period_us").write_text("100000")
            (Path(n.cpucg) / "cpu.cfs_quota_us").write_text(str(quota))

    def _shape(self, n: Node, rate_bps: int | None) -> None:
        """tc tbf at the link rate on both ends of the node's veth (upload and download)."""
        for dev, ns in ((n.host_veth, None), ("eth0", n.name)):
            pre = ("ip", "netns", "exec", ns) if ns else ()
            if rate_bps:
                # Burst: at least 2 ms of line rate and 64 KiB, so a TSO/GSO super-packet fits.
                burst = max(64 * 1024, rate_bps // 8 // 500)
                run(
                    *pre,
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{rate_bps}bit",
                    "burst",
                    str(burst),
                    "latency",
                    "50ms",
                )
            else:
                run(*pre, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    def _start_relay(self, n: Node, latency_ms: float) -> int:
        control = self.state_dir / f"{n.name}.delay"
        control.write_text(f"{latency_ms}\n")
        log = open(self.state_dir / f"{n.name}.relay.log", "ab")
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                n.name,
                sys.executable,
                "-m",
                "tpi_node.testbed.relay",
                "--port",
                str(RELAY_PORT),
                "--delay-ms",
                str(latency_ms),
                "--control",
                str(control),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        deadline = time.monotonic() + 10
        while not _listening(n.name, RELAY_PORT):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the delay relay of {n.name} did not start (log: {log.name})")
            time.sleep(0.05)
        run("ip", "netns", "exec", n.name, "nft", "-f", "-", input=nft_redirect_rules(NFT_TABLE, "eth0", RELAY_PORT))
        return proc.pid

    def set_link(self, rate: int | None | str = "keep", latency_ms: float | None = None) -> TestbedSpec:
        """Change the link shaping of a running testbed. A new latency reaches the running relays
        at once (their connections stay up); relays are started where there were none (new
        connections only then)."""
        spec = self.spec()
        if spec is None:
            raise UserError(f"testbed '{self.name}' is not up")
        state = json.loads((self.state_dir / "state.json").read_text())
        relays = state["relays"]
        if rate != "keep":
            spec = dataclasses.replace(spec, rate_bps=rate)
            for n in self.nodes():
                self._shape(n, rate)
        if latency_ms is not None:
            spec = dataclasses.replace(spec, latency_ms=latency_ms)
            for n in self.nodes():
                pid = relays.get(n.name)
                if pid and _alive(pid):
                    (self.state_dir / f"{n.name}.delay").write_text(f"{latency_ms}\n")
                    os.kill(pid, signal.SIGHUP)
                elif latency_ms > 0:
                    relays[n.name] = self._start_relay(n, latency_ms)
        self._write_state(spec, relays)
        return spec

    def down(self, quiet: bool = False) -> list[str]:
        """Remove everything named after this testbed; returns what was removed."""
        removed = []
        state_file = self.state_dir / "state.json"
        if state_file.is_file():
            for pid in json.loads(state_file.read_text()).get("relays", {}).values():
                stop_process(pid)
        for ns in run("ip", "netns", "list", check=False).stdout.split("\n"):
            ns = ns.split(" ")[0]
            if ns.startswith(f"{self.name}-n"):
                pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
                for pid in pids:
                    stop_process(int(pid), grace=0 if quiet else 2)
                run("ip", "netns", "del", ns, check=False)
                removed.append(f"netns {ns}")
        for line in run("ip", "-o", "link", "show", check=False).stdout.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            if dev == self.bridge or dev.startswith(f"{self.name}-v"):
                run("ip", "link", "del", dev, check=False)
                removed.append(f"link {dev}")
        if shutil.which("iptables"):
            while run(*self._forward_rule("-D"), check=False).returncode == 0:
                removed.append(f"iptables FORWARD rule for {self.bridge}")
        for ctrl in ("memory", "cpu"):
            own = _own_cgroup(ctrl)
            top = own / self.name if own else None
            if top and top.is_dir():
                for child in sorted(p for p in top.iterdir() if p.is_dir()):
                    _empty_cgroup(child)
                    child.rmdir()
                top.rmdir()
                removed.append(f"cgroup {ctrl}:{top}")
        if self.state_dir.is_dir():
            for f in self.state_dir.iterdir():
                f.unlink()
            self.state_dir.rmdir()
        return removed

    def _write_state(self, spec: TestbedSpec, relays: dict[str, int]) -> None:
        (self.state_dir / "state.json").write_text(
            json.dumps({"spec": dataclasses.asdict(spec), "relays": relays, "subnet": str(self.net)}, indent=1)
        )

    # ------------------------------------------------------------------ running things
    def command(self, node: str, argv: list[str]) -> list[str]:
        """argv wrapped to run as the node: in its namespace, with its hostname, in its cgroups."""
        n = self.resolve(node)
        # Join the cgroups first: `ip netns exec` mounts a fresh /sys without the cgroup tree.
        joins = "".join(f'echo $$ > "{cg}/cgroup.procs" && ' for cg in (n.memcg, n.cpucg) if cg)
        inner = f'hostname {n.name} && exec "$@"'
        return ["sh", "-c", f"{joins}exec ip netns exec {n.name} unshare --uts sh -c '{inner}' sh \"$@\"", "sh", *argv]

    def env(self, node: str) -> dict[str, str]:
        n = self.resolve(node)
        return {"TPI_TESTBED": self.name, "TPI_TESTBED_NODE": n.name, "TPI_TESTBED_IP": n.ip}

    def status(self) -> str:
        spec = self.spec()
        if spec is None:
            return f"testbed '{self.name}' is down"
        state = json.loads((self.state_dir / "state.json").read_text())
        lines = [
            f"testbed '{self.name}': {spec.describe()}; bridge {self.bridge} {self.bridge_ip}",
            f"{'node':<10} {'ip':<14} {'relay':<8} {'memory used':>12} {'limit':>10}  processes",
        ]
        for n in self.nodes():
            pid = state["relays"].get(n.name)
            relay = (str(pid) if _alive(pid) else "dead") if pid else "-"
            used = _read_int(Path(n.memcg) / "memory.usage_in_bytes") if n.memcg else None
            limit = spec.memory_bytes
            pids = run("ip", "netns", "pids", n.name, check=False).stdout.split()
            procs = [_comm(int(p)) for p in pids if int(p) != pid]
            lines.append(
                f"{n.name:<10} {n.ip:<14} {relay:<8} {_mib(used):>12} {_mib(limit):>10}  {', '.join(procs) or '-'}"
            )
        return "\n".join(lines)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP while `up` builds: everything built so far is removed, then this."""


def _raise_interrupt(signum, frame):
    raise Interrupted(f"interrupted by signal {signum}")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def stop_process(pid: int, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        if _zombie(pid):
            return
        time.sleep(0.05)
    if _alive(pid) and not _zombie(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _empty_cgroup(cg: Path) -> None:
    """Kill what is left in a cgroup so it can be removed."""
    for _ in range(50):
        pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
        if not pids:
            return
        for pid in pids:
            stop_process(pid, grace=0.5)
        time.sleep(0.05)


def _listening(ns: str, port: int) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return bool(r.stdout.strip())


def _read_int(p: Path) -> int | None:
    try:
        return int(p.read_text())
    except (OSError, ValueError):
        return None


def _mib(b: int | None) -> str:
    return "-" if b is None or b >= 2**62 else f"{b / 2**20:.0f} MiB"


def _comm(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = [w.decode(errors="replace") for w in cmd if w]
        # show "tpi-node serve" rather than a python path
        for i, w in enumerate(words):
            if w.endswith("tpi-node") or w == "tpi_node":
                return " ".join(["tpi-node", *words[i + 1 : i + 2]])
        return shlex.join(words[:2])[:40]
    except OSError:
        return str(pid)
