"""The cluster state the dashboard (GET /cluster.json) and `tpi-node status` show."""
from __future__ import annotations

import time

from tpi_node import __version__


class ClusterState:
    """cluster_state() -> dict (see server/dashboard.py for the shape). Keeps the last few
    counter samples to report live tokens/s."""

    def __init__(self, master, engine, cluster: str = "default", watch=None) -> None:
        self.master, self.engine, self.cluster = master, engine, cluster
        self.watch = watch            # discovery.WorkerWatch (serve --auto-admit): advertised workers
        self._samples: list[tuple[float, int]] = []

    def _rate(self, tokens: int) -> float:
        now = time.monotonic()
        self._samples.append((now, tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.pop(0)
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def __call__(self) -> dict:
        m, e = self.master, self.engine
        stats = e.stats()
        tps = self._rate(stats.get("completion_tokens", 0))
        plan, hub = m.plan, m.hub
        addr = {c.node_id: a for c, a in m.members}
        caps = {c.node_id: c for c, _ in m.members}
        now = time.monotonic()
        nodes = []
        if plan is not None:
            for s in plan.shares:
                peer = hub.peers.get(s.rank) if hub is not None and s.rank else None
                if s.rank == 0:
                    state, hb = ("ready" if m.runner is not None else "loading"), 0.0
                elif peer is None:
                    state, hb = "joining", None
                else:
                    state, hb = ("lost" if peer.lost else "ready"), max(0.0, now - peer.last_seen)
                cap = caps.get(s.node_id)
                nodes.append({"id": s.node_id, "rank": s.rank, "role": "master" if s.rank == 0 else "worker",
                              "address": addr.get(s.node_id, ""), "kv": [s.kv_start, s.kv_end],
                              "ffn": [s.ffn_start, s.ffn_end],
                              "memory_budget": cap.memory_bytes if cap else None,
                              "window": m.windows.get(s.rank, m.window if s.rank == 0 else None),
                              "state": state, "last_heartbeat_s": hb,
                              "tokens_per_s": tps if state == "ready" else None})
        else:
            for c, a in m.members:
                nodes.append({"id": c.node_id, "role": "master" if a == "master" else "worker", "address": a,
                              "memory_budget": c.memory_bytes, "state": "joining"})
        seen = {n["id"] for n in nodes}
        for c, a in m.lost_members:
            if c.node_id not in seen:
                nodes.append({"id": c.node_id, "role": "worker", "address": a, "state": "lost",
                              "memory_budget": c.memory_bytes})
                seen.add(c.node_id)
        for nid, (c, a, _) in list(m.pending.items()):
            if nid not in seen:
                nodes.append({"id": nid, "role": "worker", "address": a, "state": "waiting to be admitted",
                              "memory_budget": c.memory_bytes})
        for w in list(self.watch.workers) if self.watch is not None else []:
            if w.node_id not in seen:          # advertised on the network, not (yet) joined
                nodes.append({"id": w.node_id, "role": "worker", "address": w.address, "state": "discovered",
                              "memory_budget": int(w.props["memory"]) if w.props.get("memory", "").isdigit() else None})
                seen.add(w.node_id)
        ready = m.ready() and e.ready()
        return {"cluster": self.cluster, "model": e.model_name, "version": __version__, "ready": ready,
                "gpu": getattr(m, "gpu_decision", None),
                "status": "ok" if ready else (m.unservable and "not enough nodes") or m.state,
                "plan": None if plan is None else {
                    "digest": plan.digest[:16], "world_size": plan.world_size, "kv_heads": m.cfg.num_kv_heads,
                    "ffn": m.cfg.intermediate_size, "layers": m.cfg.num_layers, "wire_dtype": m.wire},
                "throughput": {"completion_tokens": stats.get("completion_tokens", 0), "tokens_per_s": tps,
                               "running": stats.get("running", 0), "waiting": stats.get("waiting", 0),
                               "requests": stats.get("requests", 0), "failed": stats.get("failed", 0)},
                "nodes": nodes}
