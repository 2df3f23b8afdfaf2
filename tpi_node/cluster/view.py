"""What the dashboard (GET /cluster.json) and `tpi-node status` show of a running master."""

from __future__ import annotations

import time

from tpi_node import __version__
from tpi_node.cluster.master import ClusterMaster
from tpi_node.cluster.membership import ClusterState


class ClusterView:
    """view() -> dict (see server/dashboard.py for the shape). Keeps the last few counter samples
    to report live tokens/s."""

    def __init__(
        self, master: ClusterMaster, engine, cluster: str = "default", watch=None, gpu: str | None = None
    ) -> None:
        self.master, self.engine, self.cluster = master, engine, cluster
        self.watch = watch  # discovery.WorkerWatch (serve --auto-admit): advertised workers
        self.gpu = gpu  # the GPU fast path's decision, with its reason
        self._samples: list[tuple[float, int]] = []

    def _rate(self, tokens: int) -> float:
        now = time.monotonic()
        self._samples.append((now, tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.pop(0)
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def _nodes(self, tps: float) -> list[dict]:
        m, d = self.master.membership, self.master.coordinator.deployment
        addr = {x.node_id: x.address for x in m.members}
        caps = {x.node_id: x.capacity for x in m.members}
        now, nodes = time.monotonic(), []
        if d is not None:
            for s in d.plan.shares:
                peer = d.sessions.peers.get(s.rank) if s.rank else None
                if s.rank == 0:
                    state, hb = "ready", 0.0
                elif peer is None:
                    state, hb = "joining", None
                else:
                    state, hb = ("lost" if peer.lost else "ready"), max(0.0, now - peer.last_seen)
                cap = caps.get(s.node_id)
                nodes.append(
                    {
                        "id": s.node_id,
                        "rank": s.rank,
                        "role": "master" if s.rank == 0 else "worker",
                        "address": addr.get(s.node_id, ""),
                        "kv": [s.kv_start, s.kv_end],
                        "ffn": [s.ffn_start, s.ffn_end],
                        "memory_budget": cap.memory_bytes if cap else None,
                        "window": d.memory.windows.get(s.rank),
                        "state": state,
                        "last_heartbeat_s": hb,
                        "tokens_per_s": tps if state == "ready" else None,
                    }
                )
        else:
            for x in m.members:
                nodes.append(
                    {
                        "id": x.node_id,
                        "role": "master" if x.address == "master" else "worker",
                        "address": x.address,
                        "memory_budget": x.capacity.memory_bytes,
                        "state": "joining",
                    }
                )
        seen = {n["id"] for n in nodes}
        for x in m.lost:
            if x.node_id not in seen:
                nodes.append(
                    {
                        "id": x.node_id,
                        "role": "worker",
                        "address": x.address,
                        "state": "lost",
                        "memory_budget": x.capacity.memory_bytes,
                    }
                )
                seen.add(x.node_id)
        for node_id, p in list(m.pending.items()):
            if node_id not in seen:
                nodes.append(
                    {
                        "id": node_id,
                        "role": "worker",
                        "address": p.member.address,
                        "state": "waiting to be admitted",
                        "memory_budget": p.member.capacity.memory_bytes,
                    }
                )
        for w in list(self.watch.workers) if self.watch is not None else []:
            if w.node_id not in seen:  # advertised on the network, not (yet) joined
                memory = w.props.get("memory", "")
                nodes.append(
                    {
                        "id": w.node_id,
                        "role": "worker",
                        "address": w.address,
                        "state": "discovered",
                        "memory_budget": int(memory) if memory.isdigit() else None,
                    }
                )
                seen.add(w.node_id)
        return nodes

    def __call__(self) -> dict:
        m, e = self.master.membership, self.engine
        spec, plan = self.master.spec, m.plan
        stats = e.stats()
        tps = self._rate(stats.get("completion_tokens", 0))
        ready = self.master.ready() and e.ready()
        status = "ok" if ready else ("not enough nodes" if m.state is ClusterState.UNSERVABLE else m.state.value)
        return {
            "cluster": self.cluster,
            "model": e.model_name,
            "version": __version__,
            "ready": ready,
            "gpu": self.gpu,
            "status": status,
            "plan": None
            if plan is None
            else {
                "digest": plan.digest[:16],
                "world_size": plan.world_size,
                "kv_heads": spec.cfg.num_kv_heads,
                "ffn": spec.cfg.intermediate_size,
                "layers": spec.cfg.num_layers,
                "wire_dtype": spec.wire,
            },
            "throughput": {
                "completion_tokens": stats.get("completion_tokens", 0),
                "tokens_per_s": tps,
                "running": stats.get("running", 0),
                "waiting": stats.get("waiting", 0),
                "requests": stats.get("requests", 0),
                "failed": stats.get("failed", 0),
            },
            "nodes": self._nodes(tps),
        }
