"""A tiny emulated LAN for tests: N network namespaces on one bridge, multicast routed so mDNS
works between them and never leaves the bridge (no default route, no link to a real network).
The bridge itself lives in its own "switch" namespace, so the host's firewall (e.g. Docker's
FORWARD policy DROP with br_netfilter) neither sees nor blocks the LAN, and nothing on the host
is changed.

    with Lan(3) as lan:                  # namespaces <p>0..<p>2, addresses 10.77.<k>.10+i/24
        p = lan.popen(0, ["tpi-node", ...])
        lan.ip(0) -> "10.77.<k>.10"

Needs root; `Lan.unavailable()` says why not (tests skip with that reason)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class Lan:
    def __init__(self, n: int) -> None:
        self.n = n
        tag = secrets.token_hex(2)
        self.prefix = f"tpl{tag}"
        self.bridge = f"{self.prefix}br"
        self.switch = f"{self.prefix}sw"
        self.subnet = 100 + int(tag, 16) % 100
        self.names = [f"{self.prefix}n{i}" for i in range(n)]

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0:
            return "needs root to create network namespaces and a bridge"
        if not shutil.which("ip"):
            return "needs iproute2 (ip)"
        probe = f"tplprobe{secrets.token_hex(2)}"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"cannot create network namespaces here: {r.stderr.strip()[:200]}"
        _ip("netns", "del", probe, check=False)
        r = _ip("link", "add", probe, "type", "bridge", check=False)
        if r.returncode != 0:
            return f"cannot create a bridge here: {r.stderr.strip()[:200]}"
        _ip("link", "del", probe, check=False)
        return None

    def ip(self, i: int) -> str:
        return f"10.77.{self.subnet}.{10 + i}"

    def __enter__(self) -> Lan:
        try:
            sw = self.switch
            _ip("netns", "add", sw)
            # no IGMP snooping: multicast (mDNS) floods to every port like on a home switch
            _ip("-n", sw, "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
            _ip("-n", sw, "link", "set", self.bridge, "up")
            for i, ns in enumerate(self.names):
                _ip("netns", "add", ns)
                a, b = f"{self.prefix}v{i}", f"{self.prefix}p{i}"
                _ip("-n", sw, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
                _ip("-n", sw, "link", "set", a, "master", self.bridge)
                _ip("-n", sw, "link", "set", a, "up")
                for args in (
                    ["link", "set", "lo", "up"],
                    ["link", "set", b, "name", "eth0"],
                    ["addr", "add", f"{self.ip(i)}/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"],
                    ["route", "add", "224.0.0.0/4", "dev", "eth0"],
                ):
                    _ip("-n", ns, *args)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.names:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes inside our own namespace: started by the test
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _ip("netns", "del", ns, check=False)
        _ip("netns", "del", self.switch, check=False)

    def cmd(self, i: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *argv]

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(i, argv), **kw)
