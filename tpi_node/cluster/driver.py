"""The engine's Driver over the cluster: every step goes to the workers first (a Step frame on
each Session), then the master runs its own slice; the collective meets the workers' partials
per layer. A failed step is aborted on every node; `recover` re-plans around a lost worker."""

from __future__ import annotations

import logging
import threading

import torch

from tpi_node.cluster.coordinator import Coordinator
from tpi_node.cluster.deployment import Deployment
from tpi_node.comm.codec import to_pb
from tpi_node.comm.star import PeerLost
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.client import ClusterNotReady
from tpi_node.engine.engine import KVStale
from tpi_node.engine.vocab import HeadAsk, HeadResult
from tpi_node.proto import tpi_pb2 as pb

log = logging.getLogger("tpi_node.driver")

# Driver.stats() entries that are levels, not running totals: never carried across plans.
GAUGES = frozenset({"window", "rss_bytes", "peak_rss_bytes", "kv_pool_bytes"})


class ClusterDriver:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.step_id = 0
        self.live: set[int] = set()  # sequences with KV cache on the nodes (empty = idle point)
        self._at_step: Deployment | None = None  # the deployment the last step ran on
        # the master's counters run on across re-plans: totals of the runners of earlier plans,
        # and the deployment whose runner counts now (each plan opens a runner from zero)
        self._earlier: dict[str, float] = {}
        self._counting: Deployment | None = None
        self._counts_lock = threading.RLock()  # stats() comes from other threads than step()
        coordinator.start_admitter(lambda: not self.live)

    def ready(self) -> bool:
        """Ready, or a worker was lost and the survivors may take over: the next step recovers."""
        return self.c.ready() or self.c.recoverable()

    def kv_blocks(self) -> int:
        d = self.c.deployment
        return 0 if d is None else d.memory.kv_blocks  # 0 until the first plan is formed

    def kv_epoch(self):
        d = self.c.deployment
        return None if d is None else d.kv_epoch()

    def step(
        self, layout: BatchLayout, x: torch.Tensor, kv_epoch, ask: HeadAsk | None = None
    ) -> tuple[torch.Tensor, HeadResult | None]:
        """-> (hidden, the split head's answer to `ask`, gathered in the same step)."""
        c = self.c
        if not c.ready():
            missing = c.sessions.missing() if c.sessions is not None else []
            raise ClusterNotReady(
                f"the cluster is not ready (waiting for rank(s) {missing})" if missing else "the cluster is not ready"
            )
        with c.lock, c.shared.borrow():
            d = self._at_step = c.deployment
            self._count_from(d)
            if d.kv_epoch() != kv_epoch:  # a node's cache started empty since the engine planned
                raise KVStale(f"KV epoch {d.kv_epoch()} is not the step's {kv_epoch}")
            self.live.update(layout.seq_ids)
            self.step_id += 1
            cut = d.runner.split_at(layout.num_tokens)  # the token split: every node cuts here
            msg = pb.MasterMsg(step=pb.Step(step_id=self.step_id, layout=layout.to_pb(), split=cut))
            to_pb(x, out=msg.step.hidden)  # the compute dtype, lossless
            if ask:
                msg.step.head.CopyFrom(ask.to_pb())
            try:
                with d.sessions.step():
                    c.shared.run(d.sessions.broadcast(msg))
                    h = d.runner.forward(layout, x, self.step_id, cut)
                    return h, d.runner.vocab_step(h, ask) if ask else None
            except Exception as e:
                abort = pb.MasterMsg(abort=pb.Abort(step_id=self.step_id, reason=str(e)))
                c.shared.run(d.sessions.send_all(abort))
                lost = c.lost_node_ids() if isinstance(e, PeerLost) else []
                if lost:
                    raise PeerLost(f"lost node(s) {', '.join(lost)}: {e}") from None
                raise

    def free(self, seq_ids) -> None:
        """The sequences ended: the engine's block pool took their blocks back; the nodes hold
        nothing per sequence, so nothing goes on the wire."""
        self.live.difference_update(seq_ids)

    def recover(self, error: BaseException) -> bool:
        """A worker was lost mid-step: re-plan over the survivors (cluster/coordinator.py); the
        engine then replays every running sequence into the new caches. False: the survivors cannot."""
        if self.c.spec.collective_init:
            log.error("a gloo ring cannot re-plan around a lost node (use the star): failing the requests")
            ok = False
        else:
            ok = self.c.recover(self._at_step)
        if not ok:
            self.live.clear()  # the engine fails every running sequence
        return ok

    def stats(self) -> dict:
        """{"master": counters}: running totals since the master started (a request's counters are
        differences of two of these, so they must never go back when a re-plan opens a new runner)."""
        d = self.c.deployment
        if d is None:
            return {}
        with self._counts_lock:
            self._count_from(d)
            now, earlier = d.runner.node_stats(), dict(self._earlier)
        return {"master": {k: v + earlier[k] if k in earlier else v for k, v in now.items()}}

    def _count_from(self, d: Deployment) -> None:
        """The runner of `d` counts from now on: fold the totals of the one before into `_earlier`."""
        with self._counts_lock:
            old, self._counting = self._counting, d
            if old is None or old is d:
                return
            for k, v in old.runner.node_stats().items():
                if k not in GAUGES and isinstance(v, (int, float)):
                    self._earlier[k] = self._earlier.get(k, 0) + v
