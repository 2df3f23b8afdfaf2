"""Prometheus metrics for GET /metrics (prometheus-client, one registry per app).

The server measures what it sees itself (requests, tokens, TTFT, time per output token). What
only the engine knows comes from a stats callback read at scrape time, shaped like:

    {
      "waiting": 3,                # sequences waiting to be scheduled ("queue_depth" also read)
      "running": 8,                # sequences in the running batch
      "nodes": {                   # cumulative seconds since start, per node id
        "master": {"compute_s": 12.5, "comm_s": 3.25, "stall_s": 0.5},
        "worker-1": {...},
      },
    }

plus "kv" (blocks used / free / cached, prefix hit rate, preemptions, evictions) and
"cached_prompt_tokens". Any key may be missing; a callback that raises is logged and skipped (the scrape still works).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tpi_node.server")

StatsFn = Callable[[], dict]

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# stats() node keys -> metric suffix
_NODE_TIMES = (("compute_s", "compute"), ("comm_s", "communication"), ("stall_s", "stall"))


class _EngineStatsCollector(Collector):
    def __init__(self, stats: StatsFn) -> None:
        self._stats = stats

    def collect(self) -> Iterable:
        try:
            s = self._stats() or {}
        except Exception:  # a scrape must not fail because the engine is busy or gone
            log.exception("engine stats callback failed")
            return
        waiting = s.get("waiting", s.get("queue_depth"))
        if waiting is not None:
            yield GaugeMetricFamily("tpi_queue_depth", "sequences waiting to be scheduled", value=float(waiting))
        if "running" in s:
            yield GaugeMetricFamily(
                "tpi_running_sequences", "sequences in the running batch", value=float(s["running"])
            )
        yield from _kv_metrics(s.get("kv"), s.get("cached_prompt_tokens"))
        yield from _step_metrics(s)
        nodes = s.get("nodes") or {}
        for key, name in _NODE_TIMES:
            fam = CounterMetricFamily(f"tpi_node_{name}_seconds", f"seconds each node spent in {name}", labels=["node"])
            for node_id, times in nodes.items():
                if key in times:
                    fam.add_metric([str(node_id)], float(times[key]))
            yield fam


def _step_metrics(s: dict) -> Iterable:
    """Speculative decoding (engine/speculative.py) and what a step yields: draft tokens proposed
    and accepted, steps run (each one round of allreduces through every layer)."""
    spec = s.get("speculative")
    if spec:
        for what in ("proposed", "accepted"):
            yield CounterMetricFamily(
                f"tpi_draft_tokens_{what}", f"speculative draft tokens {what}", value=float(spec[what])
            )
    if "steps" in s:
        yield CounterMetricFamily("tpi_engine_steps", "forward steps run through the cluster", value=float(s["steps"]))
        if s.get("completion_tokens"):
            yield GaugeMetricFamily(
                "tpi_steps_per_output_token",
                "forward steps (round trips through every layer) per generated token, since start",
                value=float(s["steps"]) / float(s["completion_tokens"]),
            )


def _kv_metrics(kv: dict | None, cached_prompt_tokens: int | None) -> Iterable:
    """The paged KV cache (engine/blocks.py): blocks by state, prefix cache hits, preemptions."""
    if not kv:
        return
    blocks = GaugeMetricFamily("tpi_kv_blocks", "KV cache blocks on every node, by state", labels=["state"])
    in_use = kv["used"]
    for state, n in (("used", in_use), ("free", kv["free"]), ("cached", kv["cached"])):
        blocks.add_metric([state], float(n))
    yield blocks
    yield GaugeMetricFamily("tpi_kv_block_tokens", "tokens per KV cache block", value=float(kv["block_tokens"]))
    yield GaugeMetricFamily(
        "tpi_prefix_cache_hit_rate",
        "prompt tokens found in the prefix cache / prompt tokens",
        value=float(kv["prefix_hit_rate"]),
    )
    yield CounterMetricFamily(
        "tpi_kv_preemptions",
        "sequences preempted (freed, recomputed later) for KV blocks",
        value=float(kv["preemptions"]),
    )
    yield CounterMetricFamily(
        "tpi_kv_evictions", "cached KV blocks reused for other tokens", value=float(kv["evictions"])
    )
    if cached_prompt_tokens is not None:
        yield CounterMetricFamily(
            "tpi_prompt_tokens_cached", "prompt tokens taken from the prefix cache", value=float(cached_prompt_tokens)
        )


class ServerMetrics:
    def __init__(self, stats: StatsFn | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tpi_requests", "HTTP API requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("tpi_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("tpi_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "tpi_time_to_first_token_seconds", "request arrival to first token", buckets=_TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "tpi_time_per_output_token_seconds",
            "mean time between output tokens of a sequence",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tpi_request_latency_seconds", "request arrival to last token", buckets=_E2E_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "tpi_server_sequences_in_flight", "sequences the HTTP layer has handed to the engine", registry=r
        )
        self.active = 0  # same count as in_flight, readable for the queue bound
        if stats is not None:
            r.register(_EngineStatsCollector(stats))

    def sequence_started(self) -> None:
        self.active += 1
        self.in_flight.inc()

    def sequence_finished(self) -> None:
        self.active -= 1
        self.in_flight.dec()

    def observe_sequence(self, *, arrival: float, first: float | None, last: float | None, tokens: int) -> None:
        """Times are time.perf_counter() values of one finished (or cancelled) sequence."""
        self.generation_tokens.inc(tokens)
        if first is not None:
            self.ttft.observe(first - arrival)
        if first is not None and last is not None and tokens > 1:
            self.tpot.observe((last - first) / (tokens - 1))
        if last is not None:
            self.e2e.observe(last - arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
