"""The Driver of a one-node cluster: the whole model on this node, nothing on the network."""

from __future__ import annotations

import torch

from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.runner import NodeRunner


class LocalDriver:
    def __init__(self, runner: NodeRunner) -> None:
        self.runner = runner
        self.step_id = 0

    def step(self, layout: BatchLayout, x: torch.Tensor) -> torch.Tensor:
        self.step_id += 1
        return self.runner.forward(layout, x, self.step_id)

    def free(self, seq_ids) -> None:
        self.runner.free(seq_ids)

    def ready(self) -> bool:
        return True

    def recover(self, error: BaseException) -> bool:
        return False

    def stats(self) -> dict:
        return {"local": self.runner.node_stats()}
