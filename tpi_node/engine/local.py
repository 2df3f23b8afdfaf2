"""The Driver of a one-node cluster: the whole model on this node, nothing on the network."""

from __future__ import annotations

import torch

from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.runner import NodeRunner


class LocalDriver:
    def __init__(self, runner: NodeRunner) -> None:
        self.runner = runner
        self.step_id = 0

    def step(self, layout: BatchLayout, x: torch.Tensor, kv_epoch=0, ask=None) -> tuple[torch.Tensor, None]:
        """One node holds the whole lm_head (ModelHead): there is never an ask."""
        self.step_id += 1
        return self.runner.forward(layout, x, self.step_id), None

    def kv_blocks(self) -> int:
        return self.runner.kv.num_blocks

    def kv_epoch(self) -> int:
        return 0  # one node, one cache, for as long as it runs

    def free(self, seq_ids) -> None:
        pass  # the engine's block pool holds everything a sequence had

    def ready(self) -> bool:
        return True

    def recover(self, error: BaseException) -> bool:
        return False

    def stats(self) -> dict:
        return {"local": self.runner.node_stats()}
