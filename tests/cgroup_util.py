"""A real memory cgroup for one child process (tests and benchmarks; needs root).

cgroup v1: a child of this process's own memory cgroup (the `N:memory:/path` line of
/proc/self/cgroup) with memory.limit_in_bytes. cgroup v2: a child of the `0::/path` cgroup with
memory.max (the memory controller must be enabled for children). The command is started through
`sh -c 'echo $$ > cgroup.procs; exec ...'`, so every byte the program allocates, python and torch
included, is charged to the cgroup. In v1 the page cache it reads is charged too; the kernel
reclaims it under the limit, anonymous memory it cannot reclaim (no swap): past the limit the
OOM killer ends the process.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


class CgroupUnavailable(RuntimeError):
    pass


def _own_cgroups() -> dict[str, str]:
    """{controller list: path} from /proc/self/cgroup ('' is the v2 unified hierarchy)."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        out[ctrl] = path
    return out


class MemoryCgroup:
    """`with MemoryCgroup(limit) as cg: cg.run([...])`; removed again on exit."""

    def __init__(self, limit_bytes: int, name: str = "tpi-test") -> None:
        self.limit = limit_bytes
        own = _own_cgroups()
        errors = []
        for make in (self._make_v1, self._make_v2):
            try:
                make(own, f"{name}-{os.getpid()}-{time.monotonic_ns() % 10**9}")
                return
            except (OSError, CgroupUnavailable) as e:
                errors.append(f"{make.__name__[6:]}: {e}")
        raise CgroupUnavailable("no memory cgroup can be made here (" + "; ".join(errors) + ")")

    def _make_v1(self, own: dict, name: str) -> None:
        parent = next((p for c, p in own.items() if "memory" in c.split(",")), None)
        if parent is None or not V1_ROOT.is_dir():
            raise CgroupUnavailable("no cgroup v1 memory hierarchy")
        self.path = V1_ROOT / parent.lstrip("/") / name
        self.path.mkdir()
        self.version = 1
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        swappiness = self.path / "memory.swappiness"
        if swappiness.exists():
            swappiness.write_text("0")

    def _make_v2(self, own: dict, name: str) -> None:
        rel = own.get("")
        root = next((r for r in V2_ROOTS if (r / "cgroup.controllers").is_file()), None)
        if rel is None or root is None:
            raise CgroupUnavailable("no cgroup v2 hierarchy")
        parent = root / rel.lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            (parent / "cgroup.subtree_control").write_text("+memory")  # fails inside a leaf with processes
        self.path = parent / name
        self.path.mkdir()
        self.version = 2
        (self.path / "memory.max").write_text(str(self.limit))
        if (self.path / "memory.swap.max").exists():
            (self.path / "memory.swap.max").write_text("0")

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def command(self, argv: list[str]) -> list[str]:
        """argv wrapped so that the process joins the cgroup before it execs."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kw)

    def peak_bytes(self) -> int | None:
        """The cgroup's high-water mark (v1 includes the page cache it was charged), or None where
        the kernel keeps none (cgroup v2 before Linux 5.19): never a number a `peak <= limit`
        check would pass with."""
        f = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        p = self.path / f
        return int(p.read_text()) if p.exists() else None

    def oom_kills(self) -> int:
        """OOM kills in the cgroup; CgroupUnavailable where the kernel does not count them."""
        f = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        for line in f.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        raise CgroupUnavailable(f"{f} has no oom_kill count (kernel too old): OOM kills cannot be told")

    def reset_peak(self) -> None:
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        if not getattr(self, "path", None) or not self.path.exists():
            return
        for _ in range(50):  # processes may take a moment to leave after exit
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()


def peak_text(peak: int | None) -> str:
    """A peak for a report line: its size, or that the kernel keeps none."""
    from tpi_node.units import format_size

    return "not kept by this kernel" if peak is None else format_size(peak)


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


class AnonPeak:
    """The peak anonymous memory (RssAnon: heap, tensors, KV blocks; what the kernel cannot
    reclaim without swap) of one process, sampled every `every` seconds while in the block.
    RSS as a whole (VmHWM) also counts the file pages of shared libraries and mapped shards,
    which the kernel reclaims under a cgroup limit and which other processes share."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every, self.peak, self.samples = pid, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._stop.is_set():
            try:
                line = next(ln for ln in status.read_text().splitlines() if ln.startswith("RssAnon:"))
            except (OSError, StopIteration):  # the process is gone
                return
            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
