"""What every node does to start computing: measure its capacity, make sure its slices are in the
shard cache, open them; and the Driver of a one-node cluster."""
from __future__ import annotations

from pathlib import Path

import torch

from tpi_node.comm.collective import Collective, LocalCollective
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.forward import NodeRunner
from tpi_node.model.config import ModelConfig
from tpi_node.weights.plan import NodeCapacity, PartitionPlan
from tpi_node.weights.slicer import DTYPES, shard_dir, write_node_shards
from tpi_node.weights.store import ShardStore


def local_capacity(node_id: str, memory_budget: int | None = None, device: str = "cpu",
                   dtype: str | None = None) -> NodeCapacity:
    """This node's capacity for the plan: memory of the device it computes on and measured speed."""
    from tpi_node.engine.device import device_capacity, select_device

    return device_capacity(node_id, select_device(device), memory_budget, dtype)


def open_runner(model_dir: Path, cfg: ModelConfig, plan: PartitionPlan, rank: int, coll: Collective,
                dtype: str = "fp32", window: int | None = None, device: str = "cpu",
                progress: bool = True) -> NodeRunner:
    """Make sure rank's slices are in the shard cache (slicing the checkpoint if not) and open them."""
    digest = plan.model_digest
    out = shard_dir(digest, plan, rank, dtype)
    write_node_shards(model_dir, cfg, plan, rank, out, dtype, progress)
    store = ShardStore(out, cfg, plan.share_of(rank), window=window, device=device)
    return NodeRunner(cfg, store, plan.share_of(rank), coll, DTYPES[dtype], device)


class LocalDriver:
    """The Driver of a one-node cluster."""

    def __init__(self, runner: NodeRunner) -> None:
        self.runner = runner

    def step(self, layout: BatchLayout, x: torch.Tensor) -> torch.Tensor:
        return self.runner.forward(layout, x)

    def free(self, seq_ids) -> None:
        self.runner.free(seq_ids)

    def ready(self) -> bool:
        return True

    def recover(self, error: BaseException) -> bool:
        return False

    def stats(self) -> dict:
        r = self.runner
        return {"local": {**r.stats.as_dict(), **r.store.stats.as_dict(), "kv_bytes": r.kv.nbytes(),
                          "kv_reserved_bytes": r.kv.reserved_bytes(), "kv_sequences": len(r.kv.lens)}}
