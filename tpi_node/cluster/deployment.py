"""A plan in force on the master: every worker rank's shard files sliced (with their manifest),
the master's own runner open on its slice, and the Sessions the workers will connect to.

    spec = ClusterSpec(model_dir, cfg, digest, dtype="fp32", wire="fp32", ...)
    d = deploy(spec, plan, memory, shared, make_collective)      # slices what the cache lacks
    d.manifests[rank]        # [ShardFile], what a worker's Join reply lists
    d.close()

A deployment holds a lease on each worker rank's slice set (weights/cache.py) from before it
slices until it closes (rank 0's runner holds its own, when --quant gives it a set): no
`--cache-size` eviction and no `tpi-node cache prune` removes a set the plan in force serves from.
Before slicing it makes room for what it will write; closing it (the plan was replaced) trims the
cache back within --cache-size, the sets only the replaced plan used now first in line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tpi_node.cluster.membership import PlanMemory
from tpi_node.cluster.sessions import Sessions
from tpi_node.comm.collective import Collective
from tpi_node.comm.loop import SharedLoop
from tpi_node.engine.runner import NodeRunner, open_runner
from tpi_node.model.config import ModelConfig
from tpi_node.settings import ADMIT_BUSY_AFTER_S
from tpi_node.weights import cache
from tpi_node.weights.plan import PartitionPlan
from tpi_node.weights.sizes import WeightBytes
from tpi_node.weights.slicer import ShardFile, manifest, set_bytes, shard_dir, write_node_shards


@dataclass(frozen=True)
class ClusterSpec:
    """What does not change while a master runs, whatever the plan."""

    model_dir: Path
    cfg: ModelConfig
    model_digest: str
    dtype: str  # of the shards and the computation
    wire: str  # of the partial sums
    device: str
    peer_timeout_s: float
    collective_init: str = ""  # tcp://:PORT of a gloo group (--collective gloo), "" for the star
    max_context: int | None = None  # --max-context: the longest sequence served
    kv_blocks: int | None = None  # --kv-blocks: every node's KV cache size, instead of the budget's
    quant: str = "none"  # --quant of float weights (model/quant.py)
    act_quant: str = "none"  # --act-quant of the quantised matmuls (model/qkernel.py), on every node
    weights: WeightBytes | None = None  # bytes per parameter as stored (default: dtype's)
    cache_size: int | None = None  # --cache-size: the shard cache's bound (None: unbounded)
    split_head: bool = False  # --head-split: every node holds lm_head rows (NodeShare.vocab_rows)
    admit_busy_after_s: float = ADMIT_BUSY_AFTER_S  # --admit-busy-after (cluster/coordinator.py)

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def config_json(self) -> str:
        return (self.model_dir / "config.json").read_text()


# The collective rank 0 computes with over a plan's sessions (chosen by commands/compose.py).
MakeCollective = Callable[[PartitionPlan, Sessions], Collective]


@dataclass
class Deployment:
    plan: PartitionPlan
    memory: PlanMemory  # each rank's window, every node's KV blocks
    manifests: dict[int, list[ShardFile]]  # worker rank -> its shard files
    sessions: Sessions
    runner: NodeRunner
    generation: int  # counts the deployments of this master: a new one means new, empty KV caches
    leases: list[cache.Lease] = field(default_factory=list)  # on every worker rank's slice set
    cache_size: int | None = None

    def kv_epoch(self) -> tuple[int, int]:
        """Changes when any node's KV cache starts empty: a new plan, or a worker's session opened
        again (a restarted worker rejoining the same plan)."""
        return self.generation, self.sessions.attaches

    def shard_dir(self, spec: ClusterSpec, rank: int) -> Path:
        return shard_dir(spec.model_digest, self.plan, rank, spec.dtype, spec.quant)

    def close(self) -> None:
        self.runner.close()
        for lease in self.leases:
            lease.release()
        cache.make_room(self.cache_size)


def deploy(
    spec: ClusterSpec,
    plan: PartitionPlan,
    memory: PlanMemory,
    shared: SharedLoop,
    make_collective: MakeCollective,
    progress: bool = True,
    generation: int = 0,
) -> Deployment:
    dirs = {r: shard_dir(spec.model_digest, plan, r, spec.dtype, spec.quant) for r in range(1, plan.world_size)}
    leases = [cache.hold(d) for d in dirs.values()]  # (rank 0's runner holds its own, when it has a set)
    try:
        _make_room(spec, plan, dirs)
        manifests = {}
        for rank, out in dirs.items():
            sums = write_node_shards(
                spec.model_dir, spec.cfg, plan, rank, out, spec.dtype, progress, spec.quant, spec.split_head
            )
            manifests[rank] = manifest(out, sums)
        sessions = Sessions(shared, plan.world_size, tuple(s.node_id for s in plan.shares))
        coll = make_collective(plan, sessions)
        runner = open_runner(
            spec.model_dir,
            spec.cfg,
            plan,
            0,
            coll,
            spec.dtype,
            memory.windows[0],
            spec.device,
            progress,
            kv_blocks=memory.kv_blocks,
            quant=spec.quant,
            split_head=spec.split_head,
        )
    except BaseException:
        for lease in leases:
            lease.release()
        raise
    cache.make_room(spec.cache_size)  # what the estimate missed
    return Deployment(plan, memory, manifests, sessions, runner, generation, leases, spec.cache_size)


def _make_room(spec: ClusterSpec, plan: PartitionPlan, dirs: dict[int, Path]) -> None:
    """Evict unused sets for what the worker ranks' sets will take (rank 0's own slice is read in
    place from the checkpoint, or, under --quant, trimmed for once it is written)."""
    if spec.cache_size is None:
        return
    per_param = spec.weights.layer if spec.weights else None
    need = sum(
        max(0, set_bytes(spec.cfg, plan.share_of(r), spec.dtype, per_param) - cache.dir_bytes(d))
        for r, d in dirs.items()
    )
    cache.make_room(spec.cache_size, need)
