"""A plan in force on the master: every worker rank's shard files sliced (with their manifest),
the master's own runner open on its slice, and the Sessions the workers will connect to.

    spec = ClusterSpec(model_dir, cfg, digest, dtype="fp32", wire="fp32", ...)
    d = deploy(spec, plan, memory, shared, make_collective)      # slices what the cache lacks
    d.manifests[rank]        # [ShardFile], what a worker's Join reply lists
    d.close()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpi_node.cluster.membership import PlanMemory
from tpi_node.cluster.sessions import Sessions
from tpi_node.comm.collective import Collective
from tpi_node.comm.loop import SharedLoop
from tpi_node.engine.runner import NodeRunner, open_runner
from tpi_node.model.config import ModelConfig
from tpi_node.weights.plan import PartitionPlan
from tpi_node.weights.sizes import WeightBytes
from tpi_node.weights.slicer import ShardFile, manifest, shard_dir, write_node_shards


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
    weights: WeightBytes | None = None  # bytes per parameter as stored (default: dtype's)

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

    def kv_epoch(self) -> tuple[int, int]:
        """Changes when any node's KV cache starts empty: a new plan, or a worker's session opened
        again (a restarted worker rejoining the same plan)."""
        return self.generation, self.sessions.attaches

    def shard_dir(self, spec: ClusterSpec, rank: int) -> Path:
        return shard_dir(spec.model_digest, self.plan, rank, spec.dtype, spec.quant)

    def close(self) -> None:
        self.runner.close()


def deploy(
    spec: ClusterSpec,
    plan: PartitionPlan,
    memory: PlanMemory,
    shared: SharedLoop,
    make_collective: MakeCollective,
    progress: bool = True,
    generation: int = 0,
) -> Deployment:
    manifests = {}
    for rank in range(1, plan.world_size):
        out = shard_dir(spec.model_digest, plan, rank, spec.dtype, spec.quant)
        sums = write_node_shards(spec.model_dir, spec.cfg, plan, rank, out, spec.dtype, progress, spec.quant)
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
    )
    return Deployment(plan, memory, manifests, sessions, runner, generation)
