"""Per-request weight-streaming counters: what a request cost each node in disk reads, load time,
compute, communication, stall (compute waiting for weights) and memory.

The engine snapshots its driver's stats when a request arrives and again when it finishes:

    before = snapshot(driver.stats())
    ...
    log.info(request_line(request_id, before, snapshot(driver.stats())))

`driver.stats()` is {node: {bytes_read, load_s, stall_s, compute_s, comm_s, peak_rss_bytes, ...}}
(LocalDriver merges NodeRunner.stats and ShardStore.stats). Requests that overlap in a batch share
steps, so their deltas overlap too: the figures are what the node did while the request ran.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

_SUMMED = ("bytes_read", "load_s", "compute_s", "comm_s", "stall_s", "layers_loaded", "tokens")


@dataclass(frozen=True)
class NodeCounters:
    bytes_read: int = 0
    load_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    stall_s: float = 0.0
    layers_loaded: int = 0
    tokens: int = 0
    peak_rss_bytes: int = 0  # a high-water mark: not differenced
    window: int = 0

    @classmethod
    def from_stats(cls, d: dict) -> NodeCounters:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def minus(self, before: NodeCounters) -> NodeCounters:
        kw = {k: getattr(self, k) - getattr(before, k) for k in _SUMMED}
        return NodeCounters(**kw, peak_rss_bytes=self.peak_rss_bytes, window=self.window)

    def line(self) -> str:
        return (
            f"read {self.bytes_read / 2**20:.0f} MiB in {self.load_s:.2f} s, compute {self.compute_s:.2f} s, "
            f"comm {self.comm_s:.2f} s, stall {self.stall_s:.2f} s, window {self.window}, "
            f"peak rss {self.peak_rss_bytes / 2**20:.0f} MiB"
        )


def snapshot(driver_stats: dict) -> dict[str, NodeCounters]:
    """{node: NodeCounters} from a Driver.stats() dict (entries that are not dicts are skipped)."""
    return {node: NodeCounters.from_stats(d) for node, d in driver_stats.items() if isinstance(d, dict)}


def request_line(request_id: str | int, before: dict[str, NodeCounters], after: dict[str, NodeCounters]) -> str:
    """One log line: every node's counters over the request's lifetime."""
    parts = []
    for node, now in after.items():
        delta = now.minus(before.get(node, NodeCounters()))
        parts.append(f"{node}: {delta.line()}")
    return f"request {request_id} weights: " + "; ".join(parts)
