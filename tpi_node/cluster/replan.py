"""Membership changes of a running cluster: a lost worker, a worker that joins or comes back.

Lost worker mid-generation (ClusterDriver.recover -> `recover`): the master makes a new plan over
the survivors (refusing when they cannot hold the model even streaming through their windows),
slices their new shards, opens its own new slice, and tells every survivor to join again
(Shutdown with rejoin=true). The survivors Join (same node ids -> their new ranks), fetch what
they lack, and open a Session on the new plan. When all are back, the engine replays each running
sequence's tokens into the new caches (it resets `cached` to 0 when recover returns True).

A new or returning worker (`admit`): its Join waits in `pending` until the master is idle (no
live sequence); then the same re-plan runs with it included, between requests.

Heartbeats (`watch_heartbeats`): a worker sends one every second while idle; a worker silent for
HEARTBEAT_TIMEOUT_S while the master is idle is declared lost (a broken TCP stream is noticed at
once; during a step the hub's partial-sum timeout applies).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from tpi_node.comm.star import PeerLost, StarHub
from tpi_node.errors import UserError
from tpi_node.weights.budget import DTYPE_BYTES, choose_window
from tpi_node.weights.plan import NodeCapacity, PartitionPlan, PlanError, make_plan

log = logging.getLogger("tpi_node.replan")

HEARTBEAT_TIMEOUT_S = 2.5     # workers beat every second: 2.5 s is two and a half missed beats
REJOIN_TIMEOUT_S = 120.0       # survivors fetch their new slices within this
ADMIT_POLL_S = 0.5
IDLE_REPLAN_GRACE_S = 10.0     # a worker lost while idle: wait this long for it before re-planning


def windows_for(master, plan: PartitionPlan, caps: list[NodeCapacity]) -> dict[int, int | None]:
    """rank -> weight window each node needs under its memory budget (None: all resident).
    Raises PlanError when a node cannot hold its share even streaming with the smallest window."""
    by_id = {c.node_id: c for c in caps}
    out = {}
    for s in plan.shares:
        budget = getattr(master, "budgets", {}).get(s.node_id)
        if budget is None:
            budget = by_id[s.node_id].memory_bytes or None
        out[s.rank] = choose_window(master.cfg, s, budget, DTYPE_BYTES.get(master.dtype, 4), is_master=s.rank == 0)
    return out


def _slice(master, plan: PartitionPlan, hub: StarHub, window: int | None):
    """Shards of every worker rank (manifests) and rank 0's runner, for a new plan."""
    from tpi_node.engine.node import open_runner
    from tpi_node.weights.slicer import shard_dir, write_node_shards

    manifests = {}
    for rank in range(1, plan.world_size):
        out = shard_dir(master.digest, plan, rank, master.dtype)
        sums = write_node_shards(master.model_dir, master.cfg, plan, rank, out, master.dtype, progress=False)
        manifests[rank] = {f: ((out / f).stat().st_size, h) for f, h in sums.items()}
    runner = open_runner(master.model_dir, master.cfg, plan, 0, hub, master.dtype, window, master.device,
                         progress=False)
    return manifests, runner


def _join_order(master) -> list[str]:
    """Node ids in the order they first joined: a returning node takes its old place, so a
    cluster that is whole again gets its old plan back (and its shard caches stay valid)."""
    if not hasattr(master, "join_order"):
        master.join_order = [c.node_id for c, _ in master.members]
    return master.join_order


def replan(master, members: list[tuple[NodeCapacity, str]], why: str) -> None:
    """Install a plan over `members` (master first) and make the current workers join again.
    Raises PlanError (nothing changed) when the members cannot hold the model."""
    order = _join_order(master)
    order.extend(c.node_id for c, _ in members if c.node_id not in order)
    members = sorted(members, key=lambda m: order.index(m[0].node_id))
    caps = [c for c, _ in members]
    plan = make_plan(master.cfg, caps, master.digest)
    windows = windows_for(master, plan, caps)
    log.warning("re-planning (%s): %d nodes, plan %s: %s", why, plan.world_size, plan.digest[:12],
                ", ".join(f"{s.node_id}: kv {s.kv_start}-{s.kv_end} ffn {s.ffn_start}-{s.ffn_end}"
                          + (f" window {windows[s.rank]}" if windows[s.rank] else "") for s in plan.shares))
    hub = StarHub(master.shared, plan.world_size, master.wire, master.peer_timeout_s)
    manifests, runner = _slice(master, plan, hub, windows[0])
    old_hub, old_runner = master.hub, master.runner
    master.members, master.manifests, master.windows = list(members), manifests, windows
    master.plan, master.hub, master.runner = plan, hub, runner
    master.window = windows[0]
    if old_runner is not None:
        with contextlib.suppress(Exception):
            old_runner.close()
    if old_hub is not None:
        master.shared.run(_send_rejoin(old_hub, why), timeout=10)


async def _send_rejoin(hub: StarHub, why: str) -> None:
    from tpi_node.proto import tpi_pb2 as pb
    msg = pb.MasterMsg(shutdown=pb.Shutdown(reason=f"the plan changed ({why}); join again", rejoin=True))
    for p in list(hub.peers.values()):
        if p.lost is None:
            with contextlib.suppress(Exception):
                await p.write(msg)
            p.lost = "left for the new plan"


async def _tell_rejoin(peer, why: str) -> None:
    from tpi_node.proto import tpi_pb2 as pb
    with contextlib.suppress(Exception):
        await asyncio.wait_for(peer.write(pb.MasterMsg(shutdown=pb.Shutdown(reason=f"{why}; join again", rejoin=True))), 5)


def wait_connected(master, timeout_s: float = REJOIN_TIMEOUT_S) -> bool:
    """Block until every rank of the current plan has a live session."""
    deadline = time.monotonic() + timeout_s
    while master.hub.missing():
        if time.monotonic() > deadline:
            log.error("rank(s) %s did not come back within %g s", master.hub.missing(), timeout_s)
            return False
        time.sleep(0.05)
    return True


def lost_node_ids(master) -> list[str]:
    hub, plan = master.hub, master.plan
    if hub is None or plan is None:
        return []
    return [plan.share_of(r).node_id for r in hub.missing()]


def recoverable(master) -> bool:
    """A worker that was connected is gone and the survivors have not been found too small."""
    hub = master.hub
    return (master.plan is not None and hub is not None and not master.unservable
            and any(p.lost for p in list(hub.peers.values())))


def recover(master, error: BaseException, hub_at_step=None) -> bool:
    """The engine's step failed: re-plan over the survivors when a worker was lost. Runs on the
    engine thread with no step in flight. False when there is nothing to recover to.
    `hub_at_step`: the hub the failed step ran on (re-planned since then by the idle path: the
    engine just replays on the new plan)."""
    if master.plan is None or master.hub is None:
        return False
    with master.replan_lock:
        _join_order(master)
        lost = lost_node_ids(master)
        if not lost:                       # a slow worker, not a lost one: do not guess
            return hub_at_step is not None and master.hub is not hub_at_step and master.ready()
        survivors = [(c, a) for c, a in master.members if c.node_id not in lost]
        gone = [(c, a) for c, a in master.members if c.node_id in lost]
        master.lost_members.extend(m for m in gone if m[0].node_id not in {c.node_id for c, _ in master.lost_members})
        master.state = "replanning"
        try:
            replan(master, survivors, f"lost {', '.join(lost)}")
        except (PlanError, UserError) as e:
            master.state = f"not enough nodes: {e}"
            log.error("the survivors cannot hold the model: %s; new requests get 503 until a node joins", e)
            master.unservable = str(e)        # the old plan stays: a lost node may come back into it
            return False
        ok = wait_connected(master)
        master.state = "ready" if ok else "waiting for nodes"
        return ok


# ---------------------------------------------------------------- admission at idle points

def pending_join(master, cap: NodeCapacity, address: str) -> asyncio.Event:
    """Called on the loop by Join for a node not in the plan: queue it for the next idle point."""
    ev = asyncio.Event()
    master.pending[cap.node_id] = (cap, address, ev)
    log.info("node %s is waiting to be admitted at the next idle moment", cap.node_id)
    return ev


def may_admit(master, node_id: str, auto_admit: bool) -> bool:
    """A former member (lost and back) is always welcome; a stranger only with --auto-admit or
    while the cluster cannot serve (a node that makes it whole)."""
    return auto_admit or bool(master.unservable) or any(c.node_id == node_id for c, _ in master.lost_members)


def admit_pending(master, idle) -> bool:
    """When `idle()` (no live sequence) and nodes wait: re-plan with them. True when it re-planned."""
    if not master.pending or master.plan is None:
        return False
    with master.replan_lock:
        if not idle() or not master.pending:
            return False
        waiting = dict(master.pending)
        plan, missing = master.plan, set(master.hub.missing())
        live = {s.node_id for s in plan.shares if s.rank == 0 or s.rank not in missing}
        members = [m for m in master.members if m[0].node_id in live and m[0].node_id not in waiting]
        members += [(c, a) for c, a, _ in waiting.values()]
        master.state = "replanning"
        try:
            replan(master, members, f"admitting {', '.join(waiting)}")
        except (PlanError, UserError) as e:
            log.error("cannot admit %s: %s", ", ".join(waiting), e)
            master.state = "ready" if not master.unservable else master.state
            for nid, (_, _, ev) in waiting.items():      # their Join answers: refused
                master.pending.pop(nid, None)
                master.shared.call(ev.set)
            return False
        master.unservable = None
        master.lost_members = [m for m in master.lost_members if m[0].node_id not in waiting]
        for nid, (_, _, ev) in waiting.items():
            master.pending.pop(nid, None)
            master.shared.call(ev.set)
        ok = wait_connected(master)
        master.state = "ready" if ok else "waiting for nodes"
        return True


def recover_idle(master, idle) -> bool:
    """A worker that was connected left while no sequence runs (its heartbeats stopped, or its
    stream broke): after IDLE_REPLAN_GRACE_S (a restarting worker comes back into the same plan
    and keeps its caches) re-plan over the survivors, before the next request needs them. A
    request in the meantime recovers at once (ClusterDriver.ready stays true while recoverable)."""
    if not recoverable(master):
        master.lost_since = None
        return False
    now = time.monotonic()
    if getattr(master, "lost_since", None) is None:
        master.lost_since = now
    if now - master.lost_since < IDLE_REPLAN_GRACE_S or not idle():
        return False
    master.lost_since = None
    with master.replan_lock:
        if not idle() or not any(p.lost for p in list(master.hub.peers.values())):
            return False
    return recover(master, PeerLost("a worker left while the cluster was idle"))


def start_admitter(master, idle) -> threading.Thread:
    """A thread that, whenever the engine is idle, re-plans around workers that left and admits
    waiting nodes."""
    def loop():
        while not master.stopped:
            try:
                if master.unservable and master.ready():
                    master.unservable, master.state = None, "ready"
                recover_idle(master, idle)
                admit_pending(master, idle)
            except Exception as e:           # never let admission take the master down
                log.error("admission failed: %s", e)
            time.sleep(ADMIT_POLL_S)
    t = threading.Thread(target=loop, name="tpi-admit", daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------- heartbeats

async def watch_heartbeats(master, timeout_s: float = HEARTBEAT_TIMEOUT_S) -> None:
    """On the master's loop: declare lost a worker silent for `timeout_s`. Ticks that come late
    (the loop was busy with a step) reset the clock instead of blaming the workers."""
    last = time.monotonic()
    while not master.stopped:
        await asyncio.sleep(0.25)
        now = time.monotonic()
        if now - last > 0.75:                 # the loop was borrowed by a step: frames are queued
            last = now
            for p in list(master.hub.peers.values()) if master.hub else []:
                p.last_seen = max(p.last_seen, now - 1.0)
            continue
        last = now
        hub = master.hub
        if hub is None:
            continue
        for p in list(hub.peers.values()):
            if p.lost is None and now - p.last_seen > timeout_s:
                log.warning("%s sent no heartbeat for %.1f s: lost", p.name(), now - p.last_seen)
                hub.detach(p, f"sent no heartbeat for {timeout_s:g} s")
                # should it wake up again, it joins again and is admitted at an idle moment
                asyncio.get_running_loop().create_task(_tell_rejoin(p, f"no heartbeat for {timeout_s:g} s"))
