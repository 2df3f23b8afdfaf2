"""The one dtype table: names used by flags and files <-> torch dtypes <-> sizes.

    torch_dtype("bf16") -> torch.bfloat16        dtype_name(torch.bfloat16) -> "bf16"
    dtype_bytes("fp16") -> 2                     SAFETENSORS["F32"] -> torch.float32

Compute dtypes (--dtype), wire dtypes (--wire) and shard dtypes all use these names.
"""

from __future__ import annotations

import torch

from tpi_node.errors import UserError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)
# --wire: a float dtype, or int8 blocks (one fp16 scale per 32 values; comm/codec.py)
WIRE_NAMES = (*DTYPE_NAMES, "int8")

# Tensor dtype codes in a safetensors header (the shard files we write and read).
SAFETENSORS: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "U8": torch.uint8,  # quantised blocks (model/quant.py QMatrix)
    "I8": torch.int8,
}

_NAME_OF = {v: k for k, v in DTYPES.items()}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or one of those torch dtypes) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in _NAME_OF:
            raise UserError(f"unsupported dtype {name}; use one of {', '.join(DTYPE_NAMES)}")
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}'; use one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 -> 'bf16' (a name is checked and returned as it is)."""
    return _NAME_OF[torch_dtype(dtype)]


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element: 4 for fp32, 2 for bf16 and fp16."""
    return torch_dtype(dtype).itemsize
