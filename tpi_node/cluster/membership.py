"""Membership: the one owner of who is in the cluster, the plan over them and the cluster's state.

    WAITING ──enough members──> FORMING ──sliced──> READY <──────────────┐
       ^                           │ (PlanError)                         │
       └──────── FAILED <──────────┘          READY ──lost / admit──> REPLANNING
                                               REPLANNING ──survivors too small──> UNSERVABLE
                                               UNSERVABLE ──a node back / admitted──> READY

Pure bookkeeping: no gRPC, no slicing (the Coordinator does those and tells Membership what
happened). Ranks are the master first, then the workers by node id: the same nodes get the same
plan (and their shard caches) whatever order they joined in, on every start, and a returning
node takes its old place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import Enum

from tpi_node.engine.budget import plan_memory
from tpi_node.model.config import ModelConfig
from tpi_node.weights.plan import NodeCapacity, PartitionPlan, make_plan
from tpi_node.weights.sizes import WeightBytes

log = logging.getLogger("tpi_node.membership")


class ClusterState(Enum):
    WAITING = "waiting for nodes"
    FORMING = "forming the plan"
    READY = "ready"
    REPLANNING = "replanning"
    UNSERVABLE = "not enough nodes"
    FAILED = "cannot form the cluster"


@dataclass(frozen=True)
class Member:
    capacity: NodeCapacity
    address: str  # how the node describes itself ("master" for rank 0)

    @property
    def node_id(self) -> str:
        return self.capacity.node_id


@dataclass(frozen=True)
class PlanMemory:
    """How a plan's nodes split their memory: each rank's weight window (None: resident) and the
    KV blocks of every node's paged cache (the least any node with KV heads can hold)."""

    windows: dict[int, int | None]
    kv_blocks: int


@dataclass
class PendingJoin:
    """A node not in the plan, waiting in its Join RPC for the next idle moment (or, in a
    cluster that is never idle, for --admit-busy-after: cluster/coordinator.py)."""

    member: Member
    answered: asyncio.Event  # set (on the master's loop) once the re-plan took it in, or failed
    since: float = field(default_factory=time.monotonic)


class Membership:
    def __init__(
        self,
        cfg: ModelConfig,
        model_digest: str,
        dtype: str,
        master: Member,
        expected: int,
        auto_admit: bool = False,
        context: int | None = None,
        kv_blocks: int | None = None,
        weights: WeightBytes | None = None,
        split_head: bool = False,
    ) -> None:
        self.cfg, self.model_digest, self.dtype, self.weights = cfg, model_digest, dtype, weights
        self.split_head = split_head  # --head-split: every node's memory holds its lm_head rows
        self.expected, self.auto_admit = expected, auto_admit
        self.context, self.kv_blocks = context, kv_blocks  # --max-context, --kv-blocks
        self.members: list[Member] = [master]  # rank order once planned; master first
        self.pending: dict[str, PendingJoin] = {}
        self.lost: list[Member] = []  # members that left and may come back
        self.plan: PartitionPlan | None = None
        self.memory: PlanMemory | None = None  # the plan's windows and KV blocks
        self.state = ClusterState.WAITING
        self.reason: str | None = None  # why FAILED / UNSERVABLE
        self.lost_since: float | None = None  # when an idle cluster first noticed a lost worker
        self.replans = 0

    def waiting_for(self) -> str:
        """What a cluster that is not ready waits for, in one line (said every few seconds)."""
        if self.state is ClusterState.WAITING:
            joined = ", ".join(m.node_id for m in self.members)
            return f"waiting for {self.expected - len(self.members)} more node(s) to join (in: {joined})"
        return f"the cluster is {self.state.value}" + (f": {self.reason}" if self.reason else "")

    # ---- forming ----------------------------------------------------------------------------------
    def add(self, member: Member) -> bool:
        """A node joined before the plan is formed. True when enough have to form it."""
        ids = [m.node_id for m in self.members]
        if member.node_id in ids:
            self.members[ids.index(member.node_id)] = member
        else:
            self.members.append(member)
        log.info("node %s joined (%d of %d)", member.node_id, len(self.members), self.expected)
        return len(self.members) >= self.expected and self.state is ClusterState.WAITING

    def propose(self, members: list[Member]) -> tuple[list[Member], PartitionPlan, PlanMemory]:
        """(members in rank order, their plan, how their memory splits); PlanError when they
        cannot hold the model, even streaming with the smallest window and KV cache."""
        master = self.members[0].node_id
        members = sorted(members, key=lambda m: (m.node_id != master, m.node_id))
        caps = [m.capacity for m in members]
        plan = make_plan(self.cfg, caps, self.model_digest, self.weights.layer if self.weights else 4)
        nodes = {
            s.rank: plan_memory(
                self.cfg,
                s,
                caps[s.rank].memory_bytes,
                self.dtype,
                budgeted=caps[s.rank].budgeted,
                is_master=s.rank == 0,
                context=self.context,
                kv_blocks=self.kv_blocks,
                weights=self.weights,
                split_head=self.split_head,
            )
            for s in plan.shares
        }
        kv_blocks = min(n.kv_blocks for n in nodes.values() if n.kv_blocks is not None)
        return members, plan, PlanMemory({r: n.window for r, n in nodes.items()}, kv_blocks)

    def install(self, members: list[Member], plan: PartitionPlan, memory: PlanMemory) -> None:
        """The plan is sliced and in force."""
        replanning = self.plan is not None
        self.members, self.plan, self.memory = list(members), plan, memory
        in_plan = {m.node_id for m in members}
        self.lost = [m for m in self.lost if m.node_id not in in_plan]
        self.state, self.reason = ClusterState.READY, None
        self.replans += replanning

    def fail(self, state: ClusterState, reason: str) -> None:
        self.state, self.reason = state, reason

    # ---- questions --------------------------------------------------------------------------------
    def rank_of(self, node_id: str) -> int | None:
        if self.plan is None:
            return None
        ids = [s.node_id for s in self.plan.shares]
        return ids.index(node_id) if node_id in ids else None

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.node_id == node_id), None)

    @property
    def master_id(self) -> str:
        return self.members[0].node_id

    def may_admit(self, node_id: str) -> bool:
        """A former member (lost and back) is always welcome; a stranger only with --auto-admit or
        while the cluster cannot serve (a node that makes it whole)."""
        return self.auto_admit or self.state is ClusterState.UNSERVABLE or any(m.node_id == node_id for m in self.lost)

    # ---- changes of a running cluster ---------------------------------------------------------------
    def wait_for_admission(self, member: Member) -> asyncio.Event:
        """Called on the loop by Join for a node not in the plan: queue it for the next idle point."""
        ev = asyncio.Event()
        self.pending[member.node_id] = PendingJoin(member, ev)
        log.info("node %s is waiting to be admitted at the next idle moment", member.node_id)
        return ev

    def lose(self, node_ids: list[str]) -> list[Member]:
        """Those members left: remember them (they may come back) -> the survivors."""
        known = {m.node_id for m in self.lost}
        self.lost += [m for m in self.members if m.node_id in node_ids and m.node_id not in known]
        return [m for m in self.members if m.node_id not in node_ids]

    def with_pending(self, live_ids: set[str]) -> tuple[dict[str, PendingJoin], list[Member]]:
        """(the waiting joins, the members a plan that admits them would have)."""
        waiting = dict(self.pending)
        members = [m for m in self.members if m.node_id in live_ids and m.node_id not in waiting]
        return waiting, members + [p.member for p in waiting.values()]
