"""The Tensor wire type: torch.Tensor <-> tpi.Tensor (dtype enum + shape + raw little-endian bytes).

    msg = to_pb(t, torch.bfloat16)                         # encode (cast to the wire dtype)
    t = from_pb(msg, shape=(T, H), what="partial")        # decode and validate

Never pickle. bf16 has no numpy dtype, so its bytes travel as the int16 view of the tensor.
The int8 wire (`--wire int8`, torch.int8 here) sends [T, H] as GGUF Q8_0 blocks: per 32 values an
fp16 scale and 32 int8 (34 bytes instead of 128 in fp32); decoded to fp32.
Every received tensor is validated before use (dtype, shape, byte length, a size bound, and the
shape the receiver expects) and anything else raises `FrameError` with a one-line message.
"""

from __future__ import annotations

import math
import warnings

import torch

from tpi_node.dtypes import DTYPES, WIRE_NAMES, dtype_name
from tpi_node.errors import TpiError
from tpi_node.model.quant import BLOCK, BLOCK_BYTES, QMatrix, quantize
from tpi_node.proto import tpi_pb2 as pb

INT8 = torch.int8  # stands for the int8 block wire
_TO_ENUM = {DTYPES["fp32"]: pb.FLOAT32, DTYPES["bf16"]: pb.BFLOAT16, DTYPES["fp16"]: pb.FLOAT16, INT8: pb.INT8_BLOCKS}
_FROM_ENUM = {v: k for k, v in _TO_ENUM.items()}
# Same-width integer views: .numpy() has no bfloat16, and torch.frombuffer wants a plain dtype.
_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

MAX_TENSOR_BYTES = 1 << 30  # no frame of ours carries more than 1 GiB
MAX_DIMS = 4

# torch.frombuffer warns on read-only buffers (protobuf bytes); we copy or only read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class FrameError(TpiError, ValueError):
    """A received frame is malformed: wrong dtype, shape, length, or out of order."""


def wire_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' | 'int8' (or the torch dtypes standing for them) -> the torch dtype;
    FrameError else."""
    t = dtype if isinstance(dtype, torch.dtype) else (INT8 if dtype == "int8" else DTYPES.get(dtype))
    if t not in _TO_ENUM:
        raise FrameError(f"unsupported wire dtype {dtype}; use one of {', '.join(WIRE_NAMES)}")
    return t


def wire_name(dtype: torch.dtype) -> str:
    return "int8" if dtype == INT8 else dtype_name(dtype)


def wire_nbytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of `numel` values on the wire."""
    return numel * BLOCK_BYTES["q8_0"] // BLOCK if dtype == INT8 else numel * dtype.itemsize


def dtype_enum(dtype: str | torch.dtype) -> int:
    """'fp32' / torch.float32 -> the wire enum."""
    return _TO_ENUM[wire_dtype(dtype)]


def dtype_of_enum(code: int) -> torch.dtype:
    """The wire enum -> torch dtype (FrameError for an unknown code)."""
    if code not in _FROM_ENUM:
        raise FrameError(f"unknown dtype code {code}")
    return _FROM_ENUM[code]


def to_pb(t: torch.Tensor, dtype: str | torch.dtype | None = None, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode `t` (any shape) as `dtype` (default: its own); fills `out` in place when given."""
    dtype = wire_dtype(dtype or t.dtype)
    t = t.detach()
    if dtype == INT8:
        if t.dim() == 0 or t.shape[-1] % BLOCK:
            raise FrameError(f"the int8 wire needs rows of a multiple of {BLOCK} values, not {list(t.shape)}")
        msg = out if out is not None else pb.Tensor()
        msg.dtype = pb.INT8_BLOCKS
        msg.shape[:] = t.shape
        msg.data = quantize(t.cpu().reshape(-1, t.shape[-1]), "q8_0").data.numpy().tobytes()
        return msg
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.device.type != "cpu":
        t = t.cpu()
    data = t.contiguous().view(_VIEW[dtype]).numpy().tobytes()
    msg = out if out is not None else pb.Tensor()
    msg.dtype = _TO_ENUM[dtype]
    msg.shape[:] = t.shape
    msg.data = data
    return msg


def from_pb(
    msg: pb.Tensor, shape: tuple[int, ...] | None = None, copy: bool = True, what: str = "tensor"
) -> torch.Tensor:
    """Decode and validate. `shape`: the shape the receiver expects (None: any, within bounds).
    copy=False returns a read-only view of the message bytes (use it only to read)."""
    dtype = _FROM_ENUM.get(msg.dtype)
    if dtype is None:
        raise FrameError(f"{what}: unknown dtype code {msg.dtype}")
    dims = tuple(msg.shape)
    if len(dims) > MAX_DIMS or any(d < 0 for d in dims):
        raise FrameError(f"{what}: bad shape {list(dims)}")
    if shape is not None and dims != tuple(shape):
        raise FrameError(f"{what}: shape {list(dims)} where {list(shape)} was expected")
    n = math.prod(dims)
    nbytes = wire_nbytes(n, dtype)
    if nbytes > MAX_TENSOR_BYTES:
        raise FrameError(f"{what}: {nbytes} bytes is over the {MAX_TENSOR_BYTES} byte limit")
    if len(msg.data) != nbytes or (dtype == INT8 and (not dims or dims[-1] % BLOCK)):
        raise FrameError(
            f"{what}: {len(msg.data)} bytes for shape {list(dims)} of {wire_name(dtype)} (expected {nbytes})"
        )
    if n == 0:
        return torch.empty(dims, dtype=torch.float32 if dtype == INT8 else dtype)
    if dtype == INT8:  # Q8_0 blocks -> fp32 (a fresh tensor either way)
        blocks = torch.frombuffer(msg.data, dtype=torch.uint8).view(n // dims[-1], dims[-1] // BLOCK, -1)
        return QMatrix(blocks).dequantize().view(dims)
    t = torch.frombuffer(msg.data, dtype=_VIEW[dtype]).view(dtype).view(dims)
    return t.clone() if copy else t
