"""Bytes per weight of a model as its nodes will hold it: what the memory budget, the window and
the plan count (a quantised layer is 4.5-8.5 bits a weight, not the compute dtype's 16 or 32).

    wb = weight_bytes(model_dir, "fp32", "int4")    # WeightBytes(layer=0.625, head=1.0625)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tpi_node.dtypes import dtype_bytes
from tpi_node.model.quant import BLOCK, BLOCK_BYTES, QUANT_FORMAT
from tpi_node.weights.checkpoint import open_checkpoint
from tpi_node.weights.head_rows import EMBED, LM_HEAD


@dataclass(frozen=True)
class WeightBytes:
    layer: float  # bytes per parameter of a layer's matrices
    head: float  # bytes per parameter of the embedding / lm_head matrix


LAYER_SAMPLE = "model.layers.0.mlp.up_proj.weight"  # the format of a layer's bulk


def float_bytes(dtype: str) -> WeightBytes:
    return WeightBytes(float(dtype_bytes(dtype)), float(dtype_bytes(dtype)))


def _per_param(fmt: str) -> float:
    return BLOCK_BYTES[fmt] / BLOCK


def weight_bytes(model_dir: str | Path, dtype: str, quant: str = "none") -> WeightBytes:
    """Stored blocks count as they are (a GGUF's, or `synth --quant`'s): its first layer's up_proj
    and its output matrix; float weights count in dtype, or in the format --quant writes (the head
    then at q8_0)."""
    reader = open_checkpoint(model_dir)
    try:
        head_name = LM_HEAD if reader.has(LM_HEAD) else EMBED
        layer_fmt, head_fmt = reader.block_format(LAYER_SAMPLE), reader.block_format(head_name)
    finally:
        reader.close()
    as_float = float(dtype_bytes(dtype))
    if quant != "none":
        layer_fmt, head_fmt = layer_fmt or QUANT_FORMAT[quant], head_fmt or "q8_0"
    return WeightBytes(_per_param(layer_fmt) if layer_fmt else as_float, _per_param(head_fmt) if head_fmt else as_float)
