"""The single-node engine: one node holds the whole model."""
from __future__ import annotations

from pathlib import Path

from tpi_node.comm.collective import LocalCollective
from tpi_node.engine.engine import Engine, EngineLimits
from tpi_node.engine.head import ModelHead
from tpi_node.engine.node import LocalDriver, local_capacity, open_runner
from tpi_node.model.config import ModelConfig
from tpi_node.model.tokenizer import Tokenizer
from tpi_node.weights.checkpoint import model_digest
from tpi_node.weights.plan import make_plan
from tpi_node.weights.slicer import DTYPES


def build_local_engine(model: str | Path, dtype: str = "fp32", window: int | None = None,
                       limits: EngineLimits | None = None, progress: bool = True,
                       memory_budget: str | None = None, device: str = "cpu") -> Engine:
    """A single-node engine over a model name (prepared on first use) or a model directory."""
    from tpi_node.weights.prepare import resolve_model

    model_dir = resolve_model(str(model), progress=progress)
    cfg = ModelConfig.from_dir(model_dir)
    plan = make_plan(cfg, [local_capacity("local", device=device, dtype=dtype)], model_digest(model_dir))
    if memory_budget is not None and window is None:
        from tpi_node.weights.budget import window_for_budget

        window = window_for_budget(cfg, plan.share_of(0), memory_budget, dtype, is_master=True)
    runner = open_runner(model_dir, cfg, plan, 0, LocalCollective(), dtype, window, device, progress=progress)
    head = ModelHead(model_dir, cfg, DTYPES[dtype], device, prepacked=memory_budget is None and window is None)
    name = Path(model).name if Path(str(model)).exists() else str(model)
    return Engine(cfg, head, Tokenizer.from_dir(model_dir), LocalDriver(runner), name, limits)
