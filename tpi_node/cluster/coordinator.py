"""The Coordinator changes the cluster: it forms the first plan, re-plans around a lost worker,
admits waiting nodes at idle moments, and keeps the Deployment of the plan in force. Membership
(cluster/membership.py) records who is in and what state the cluster is in; the Coordinator is
the only code that changes it.

Lost worker mid-generation (ClusterDriver.recover -> `recover`): a new plan over the survivors
(refused when they cannot hold the model even streaming through their windows), their new shards
sliced, the master's new slice opened, and every survivor told to join again (ShutdownCode.REJOIN).
They Join (same node ids -> their new ranks), fetch what they lack and open a Session on the new
plan; the engine then replays each running sequence's tokens into the new caches.

A new or returning worker: its Join waits in `pending` until the master is idle (no live
sequence); then the same re-plan runs with it included, between requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from tpi_node import heap
from tpi_node.cluster.deployment import ClusterSpec, Deployment, MakeCollective, deploy
from tpi_node.cluster.membership import ClusterState, Member, Membership
from tpi_node.cluster.sessions import Sessions
from tpi_node.comm.loop import SharedLoop
from tpi_node.engine.limits import BLOCK_TOKENS
from tpi_node.errors import UserError
from tpi_node.proto import tpi_pb2 as pb

log = logging.getLogger("tpi_node.coordinator")

REJOIN_TIMEOUT_S = 120.0  # survivors fetch their new slices within this
ADMIT_POLL_S = 0.5
IDLE_REPLAN_GRACE_S = 10.0  # a worker lost while idle: wait this long for it before re-planning


def _describe(d: Deployment) -> str:
    return (
        ", ".join(
            f"{s.node_id}: kv {s.kv_start}-{s.kv_end} ffn {s.ffn_start}-{s.ffn_end}"
            + (f" window {d.memory.windows[s.rank]}" if d.memory.windows[s.rank] else "")
            for s in d.plan.shares
        )
        + f"; KV cache {d.memory.kv_blocks} blocks ({d.memory.kv_blocks * BLOCK_TOKENS} tokens) on every node"
    )


class Coordinator:
    def __init__(
        self, spec: ClusterSpec, membership: Membership, shared: SharedLoop, make_collective: MakeCollective
    ) -> None:
        self.spec, self.membership, self.shared = spec, membership, shared
        self.make_collective = make_collective
        self.deployment: Deployment | None = None
        self.generations = 0  # deployments made (names each one's KV caches)
        self.lock = threading.Lock()  # one membership change, or one step, at a time
        self.formed = threading.Event()  # the first plan was formed, or could not be
        self.stopped = False

    # ---- state --------------------------------------------------------------------------------------
    @property
    def sessions(self) -> Sessions | None:
        return self.deployment.sessions if self.deployment is not None else None

    def ready(self) -> bool:
        """Every rank of the plan in force has a live session."""
        return self.deployment is not None and not self.deployment.sessions.missing()

    def lost_node_ids(self) -> list[str]:
        d = self.deployment
        return [] if d is None else [d.plan.share_of(r).node_id for r in d.sessions.missing()]

    def recoverable(self) -> bool:
        """A worker that was connected is gone and the survivors have not been found too small."""
        d = self.deployment
        return d is not None and self.membership.state is not ClusterState.UNSERVABLE and d.sessions.any_lost()

    # ---- the first plan ---------------------------------------------------------------------------------
    async def form(self) -> None:
        """On the master's loop once enough members joined: plan, slice, open rank 0."""
        m = self.membership
        m.state = ClusterState.FORMING
        try:
            members, plan, memory = m.propose(m.members)
            loop = asyncio.get_running_loop()
            d = await loop.run_in_executor(None, lambda: self._deploy(plan, memory, progress=True))
            log.info("plan %s over %d nodes: %s", plan.digest[:12], plan.world_size, _describe(d))
            self.deployment = d
            m.install(members, plan, memory)
        except (UserError, OSError) as e:
            m.fail(ClusterState.FAILED, str(e))
            log.error("cannot form the cluster: %s", e)
        self.formed.set()

    def _deploy(self, plan, memory, progress: bool) -> Deployment:
        self.generations += 1
        return deploy(self.spec, plan, memory, self.shared, self.make_collective, progress, self.generations)

    # ---- re-planning ------------------------------------------------------------------------------------
    def _replan(self, members: list[Member], why: str) -> None:
        """Install a plan over `members` and make the current workers join again. Caller holds
        the lock. Raises PlanError (nothing changed) when the members cannot hold the model."""
        members, plan, memory = self.membership.propose(members)
        d = self._deploy(plan, memory, progress=False)
        log.warning("re-planning (%s): %d nodes, plan %s: %s", why, plan.world_size, plan.digest[:12], _describe(d))
        old, self.deployment = self.deployment, d
        self.membership.install(members, plan, memory)
        if old is not None:
            old.close()
            old.sessions.shutdown_all(pb.REJOIN, f"the plan changed ({why}); join again")
            heap.trim()  # the old slice and KV pool were freed: give the pages back

    def _wait_connected(self, timeout_s: float = REJOIN_TIMEOUT_S) -> bool:
        """Block until every rank of the plan in force has a live session."""
        deadline = time.monotonic() + timeout_s
        while self.deployment.sessions.missing():
            if time.monotonic() > deadline:
                log.error("rank(s) %s did not come back within %g s", self.deployment.sessions.missing(), timeout_s)
                return False
            time.sleep(0.05)
        return True

    def recover(self, at_step: Deployment | None = None) -> bool:
        """The engine's step failed: re-plan over the survivors when a worker was lost. Runs on the
        engine thread with no step in flight. False when there is nothing to recover to.
        `at_step`: the deployment the failed step ran on (re-planned since then by the idle path:
        the engine just replays on the new plan)."""
        if self.deployment is None:
            return False
        with self.lock:
            lost = self.lost_node_ids()
            if not lost:  # a slow worker, not a lost one: do not guess
                return at_step is not None and self.deployment is not at_step and self.ready()
            m = self.membership
            survivors = m.lose(lost)
            m.state = ClusterState.REPLANNING
            try:
                self._replan(survivors, f"lost {', '.join(lost)}")
            except UserError as e:
                m.fail(ClusterState.UNSERVABLE, str(e))  # the old plan stays: a lost node may come back
                log.error("the survivors cannot hold the model: %s; new requests get 503 until a node joins", e)
                return False
            ok = self._wait_connected()
            if not ok:
                m.state = ClusterState.WAITING
            return ok

    def admit_pending(self, idle: Callable[[], bool]) -> bool:
        """When nodes wait and `idle()` (no live sequence), or one has waited --admit-busy-after:
        re-plan with them, between two steps (the engine's step holds the lock). True when it
        re-planned."""
        m = self.membership
        if not m.pending or self.deployment is None or not (idle() or self._waited_long()):
            return False
        with self.lock:
            if not m.pending or not (idle() or self._waited_long()):
                return False
            d = self.deployment
            missing = set(d.sessions.missing())
            live = {s.node_id for s in d.plan.shares if s.rank == 0 or s.rank not in missing}
            waiting, members = m.with_pending(live)
            before = m.state
            m.state = ClusterState.REPLANNING
            try:
                self._replan(members, f"admitting {', '.join(waiting)}")
            except UserError as e:
                log.error("cannot admit %s: %s", ", ".join(waiting), e)
                m.state = before
                self._answer(waiting)  # their Join answers: refused (not in the plan)
                return False
            self._answer(waiting)
            if not self._wait_connected():
                m.state = ClusterState.WAITING
            return True

    def _waited_long(self) -> bool:
        now = time.monotonic()
        wait = self.spec.admit_busy_after_s
        return any(now - p.since >= wait for p in list(self.membership.pending.values()))

    def _answer(self, waiting) -> None:
        for node_id, p in waiting.items():
            self.membership.pending.pop(node_id, None)
            self.shared.call(p.answered.set)

    def recover_idle(self, idle: Callable[[], bool]) -> bool:
        """A worker that was connected left while no sequence runs (its heartbeats stopped, or its
        stream broke): after IDLE_REPLAN_GRACE_S (a restarting worker comes back into the same plan
        and keeps its caches) re-plan over the survivors, before the next request needs them. A
        request in the meantime recovers at once (ClusterDriver.ready stays true while recoverable)."""
        m = self.membership
        if not self.recoverable():
            m.lost_since = None
            return False
        now = time.monotonic()
        if m.lost_since is None:
            m.lost_since = now
        if now - m.lost_since < IDLE_REPLAN_GRACE_S or not idle():
            return False
        m.lost_since = None
        with self.lock:
            if not idle() or not self.deployment.sessions.any_lost():
                return False
        return self.recover()

    def start_admitter(self, idle: Callable[[], bool]) -> threading.Thread:
        """A thread that, whenever the engine is idle, re-plans around workers that left and admits
        waiting nodes."""

        def loop():
            m = self.membership
            while not self.stopped:
                try:
                    if m.state is ClusterState.UNSERVABLE and self.ready():  # the lost node came back
                        m.state, m.reason = ClusterState.READY, None
                    self.recover_idle(idle)
                    self.admit_pending(idle)
                except Exception as e:  # never let admission take the master down
                    log.error("admission failed: %s", e)
                time.sleep(ADMIT_POLL_S)

        t = threading.Thread(target=loop, name="tpi-admit", daemon=True)
        t.start()
        return t

    def stop(self, reason: str) -> None:
        self.stopped = True
        if self.deployment is not None:
            self.deployment.sessions.shutdown_all(pb.MASTER_STOPPING, reason)
