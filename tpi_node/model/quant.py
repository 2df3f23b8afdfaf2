"""Quantised weight matrices, kept in GGUF's own block formats end to end.

A QMatrix is a [N, K] weight stored as N rows of K/32 blocks, each block exactly as llama.cpp
writes it, or a K-quant's 32-weight sub-block (see model/qmatmul.c for the byte layout):

    q4_0  18 bytes / 32 weights   w = d (q - 8)          (GGUF Q4_0)
    q4_1  20 bytes / 32 weights   w = d q + m            (GGUF Q4_1; what --quant int4 writes)
    q8_0  34 bytes / 32 weights   w = d q                (GGUF Q8_0; what --quant int8 writes)
    q5_0  22 bytes / 32 weights   w = d (q - 16)         (GGUF Q5_0: 5-bit q, its fifth bits in a word)
    q5_1  24 bytes / 32 weights   w = d q + m            (GGUF Q5_1)
    q4_k  23 bytes / 32 weights   w = (d sc) q - dmin mn (GGUF Q4_K, repacked: weights/repack.py)
    q6_k  36 bytes / 32 weights   w = (d sc_half) q      (GGUF Q6_K, repacked; one scale per 16)
    q8_mix 40 bytes / 32 weights  w = (d sc_half) q - dmin mn
                                  (each of the above exactly: a fused matrix whose parts differ, as_mixed)

`data` is uint8 [N, K/32, block bytes]; the last dimension names the format, so a shard file
needs no extra metadata. Rows slice freely; columns slice at multiples of 32 (head dims and the
plan's FFN blocks are). A GGUF's blocks are copied as they are: no dequantised copy exists
anywhere, and dequantising gives bit for bit what transformers (gguf-py) computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi_node.errors import UserError
from tpi_node.settings import QUANTS

BLOCK = 32  # weights per block, every format
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34, "q5_0": 22, "q5_1": 24, "q4_k": 23, "q6_k": 36, "q8_mix": 40}
FORMAT_OF_BYTES = {v: k for k, v in BLOCK_BYTES.items()}
# the kernel's format codes (model/qmatmul.c)
KIND = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q4_k": 3, "q6_k": 4, "q8_mix": 5, "q5_0": 6, "q5_1": 7}
NIBBLES_AT = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8, "q4_k": 7}  # where a 4/5-bit block's nibbles start

QUANT_FORMAT = {"int8": "q8_0", "int4": "q4_1"}  # what --quant writes for a float weight


@dataclass(frozen=True)
class QMatrix:
    data: torch.Tensor  # uint8 [N, K/32, block bytes]

    @property
    def fmt(self) -> str:
        return FORMAT_OF_BYTES[self.data.shape[-1]]

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.data.shape[1] * BLOCK

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, start: int, end: int) -> QMatrix:
        return QMatrix(self.data[start:end])

    def cols(self, start: int, end: int) -> QMatrix:
        if start % BLOCK or end % BLOCK:
            raise UserError(f"a {self.fmt} matrix can only be cut at multiples of {BLOCK} columns, not {start}:{end}")
        return QMatrix(self.data[:, start // BLOCK : end // BLOCK])

    def take(self, index: torch.Tensor) -> QMatrix:
        """Rows in the given order (GGUF's q/k row permutation is undone this way)."""
        return QMatrix(self.data[index])

    def contiguous(self) -> QMatrix:
        return QMatrix(self.data.contiguous())

    def to(self, device) -> QMatrix:
        return QMatrix(self.data.to(device))

    def small_quants(self) -> torch.Tensor:
        """A 4- or 5-bit format's q (0..15 or 0..31) as uint8 [N, nb, 32]: byte j of the nibbles
        holds weights j and j + 16; a 5-bit one's fifth bits are the 32 bits before them."""
        d = self.data
        qs = d[..., NIBBLES_AT[self.fmt] :]
        q = torch.cat([qs & 15, qs >> 4], dim=-1)
        if self.fmt in ("q5_0", "q5_1"):
            at = NIBBLES_AT[self.fmt] - 4
            word = d[..., at : at + 4].contiguous().view(torch.int32)  # [N, nb, 1], little-endian
            q |= ((word >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8) << 4
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in `dtype`, computed in fp32 as gguf-py does (pure torch: any device)."""
        d = self.data
        scale = d[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
        if self.fmt == "q8_0":
            w = d[..., 2:].contiguous().view(torch.int8).float() * scale
        elif self.fmt in ("q6_k", "q8_mix"):  # two scales a block, d sc each (exact in fp32), over 16 weights
            at = 2 if self.fmt == "q6_k" else 4
            halves = scale * d[..., at : at + 2].contiguous().view(torch.int8).float()  # [N, nb, 2]
            q = d[..., at + 2 + 2 * (self.fmt == "q8_mix") :].contiguous().view(torch.int8).float()
            w = (q.unflatten(-1, (2, 16)) * halves.unsqueeze(-1)).flatten(-2)
            if self.fmt == "q8_mix":
                w = w - d[..., 2:4].contiguous().view(torch.float16).float() * d[..., 6:7].float()
        else:
            q = self.small_quants().float()
            if self.fmt == "q4_k":  # as gguf-py: (d sc) q - dmin mn, the products exact in fp32
                dmin = d[..., 2:4].contiguous().view(torch.float16).float()
                w = q * (scale * d[..., 4:5].float()) - dmin * d[..., 5:6].float()
            elif self.fmt in ("q4_1", "q5_1"):
                w = q * scale + d[..., 2:4].contiguous().view(torch.float16).float()
            else:  # q4_0, q5_0: d (q - 8), d (q - 16)
                w = (q - (8 if self.fmt == "q4_0" else 16)) * scale
        return w.reshape(self.shape).to(dtype)


def cat_rows(parts: list) -> torch.Tensor | QMatrix:
    """Stack row blocks: tensors with torch.cat, QMatrix blocks of one format block-wise."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    if all(isinstance(p, QMatrix) for p in parts) and len({p.fmt for p in parts}) == 1:
        return QMatrix(torch.cat([p.data for p in parts]))
    if all(isinstance(p, QMatrix) for p in parts):  # a GGUF may quantise q and v differently
        fmts = {p.fmt for p in parts}
        if fmts <= {"q4_0", "q5_0", "q8_0"}:  # d (q - offset): q8_0 holds them all (llama.cpp's Q5_0 + Q8_0)
            return QMatrix(torch.cat([_as_q8_0(p).data for p in parts]))
        if fmts <= {"q4_1", "q5_1"}:  # d q + m: q5_1 holds both
            return QMatrix(torch.cat([_as_q5_1(p).data for p in parts]))
        return QMatrix(torch.cat([as_mixed(p).data for p in parts]))
    return torch.cat([p.dequantize() if isinstance(p, QMatrix) else p.float() for p in parts])


def _as_q8_0(w: QMatrix) -> QMatrix:
    """q4_0 / q5_0 blocks as q8_0 ones, exactly: the same d, q - 8 or q - 16 as int8."""
    if w.fmt == "q8_0":
        return w
    q = w.small_quants().to(torch.int8) - (8 if w.fmt == "q4_0" else 16)
    return QMatrix(torch.cat([w.data[..., 0:2], q.view(torch.uint8)], dim=-1))


def _as_q5_1(w: QMatrix) -> QMatrix:
    """q4_1 blocks as q5_1 ones, exactly: the same d, m and nibbles, no fifth bits."""
    if w.fmt == "q5_1":
        return w
    d = w.data
    return QMatrix(torch.cat([d[..., 0:4], torch.zeros(*d.shape[:2], 4, dtype=torch.uint8), d[..., 4:]], dim=-1))


def mixed_blocks(d: torch.Tensor, q: torch.Tensor, scales=None, dmin: torch.Tensor | None = None, mn=None) -> QMatrix:
    """q8_mix blocks [N, nb, 40] from their fields: d (fp16 bytes [N, nb, 2]), q (int8 [N, nb, 32]),
    the int8 scales of the two halves ([N, nb, 2]; 1 and 1 by default), dmin (fp16 bytes; 0) and mn
    (u8; 0): w = (d sc_half) q - dmin mn."""
    out = torch.zeros(*q.shape[:2], BLOCK_BYTES["q8_mix"], dtype=torch.uint8)
    out[..., 0:2] = d
    out[..., 4:6] = 1 if scales is None else scales
    if dmin is not None:
        out[..., 2:4], out[..., 6] = dmin, mn
    out[..., 8:] = q.contiguous().view(torch.uint8)
    return QMatrix(out)


def as_mixed(w: QMatrix) -> QMatrix:
    """Any block format as q8_mix blocks that dequantise to the same weights, bit for bit: the one
    format a fused matrix (q|k|v, gate|up) can hold when its parts differ (a Q4_K_M file's attn_v is
    Q6_K in some layers, its q and k Q4_K). 40 bytes a block: more than any part's, a tenth of fp32's."""
    d, fmt = w.data, w.fmt
    if fmt == "q8_mix":
        return w
    if fmt == "q8_0":
        return mixed_blocks(d[..., 0:2], d[..., 2:].view(torch.int8))
    if fmt == "q6_k":
        return mixed_blocks(d[..., 0:2], d[..., 4:].view(torch.int8), d[..., 2:4])
    q = w.small_quants().to(torch.int8)
    if fmt in ("q4_0", "q5_0"):  # d (q - 8), d (q - 16)
        return mixed_blocks(d[..., 0:2], q - (8 if fmt == "q4_0" else 16))
    if fmt in ("q4_1", "q5_1"):  # d q + m: dmin = -m, mn = 1 (negating an fp16 is exact)
        return mixed_blocks(d[..., 0:2], q, None, (-d[..., 2:4].contiguous().view(torch.float16)).view(torch.uint8), 1)
    return mixed_blocks(d[..., 0:2], q, d[..., 4:5].expand(*d.shape[:2], 2), d[..., 2:4], d[..., 5])  # q4_k


def quantize(w: torch.Tensor, fmt: str) -> QMatrix:
    """A float [N, K] weight (K a multiple of 32) -> QMatrix in q4_1 or q8_0, as llama.cpp's
    reference quantisers do: per block, q8_0 scales by max|w| / 127; q4_1 maps [min, max] to 0..15.
    """
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise UserError(f"cannot quantise a {list(w.shape)} weight: columns must be a multiple of {BLOCK}")
    n, k = w.shape
    b = w.float().reshape(n, k // BLOCK, BLOCK)
    if fmt == "q8_0":
        d = (b.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
        inv = torch.where(d == 0, 0.0, 1.0 / d.float())
        q = (b * inv).round().clamp(-127, 127).to(torch.int8)
        return QMatrix(torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=-1).contiguous())
    if fmt == "q4_1":
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = ((hi - lo) / 15).to(torch.float16)
        m = lo.to(torch.float16)
        inv = torch.where(d == 0, 0.0, 1.0 / d.float())
        q = ((b - m.float()) * inv).round().clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        return QMatrix(torch.cat([d.view(torch.uint8), m.view(torch.uint8), packed], dim=-1).contiguous())
    raise UserError(f"unknown quantised format {fmt!r}; use one of {', '.join(BLOCK_BYTES)}")


def quantizable(w: torch.Tensor) -> bool:
    """A float matrix whose rows split into whole blocks (others stay in --dtype)."""
    return w.dim() == 2 and w.shape[1] % BLOCK == 0


def quantize_for(w: torch.Tensor, quant: str) -> torch.Tensor | QMatrix:
    """--quant applied to one float matrix: 'none' keeps it; int8 / int4 quantise it."""
    if quant == "none":
        return w
    if quant not in QUANT_FORMAT:
        raise UserError(f"unknown --quant {quant!r}; use one of {', '.join(QUANTS)}")
    return quantize(w, QUANT_FORMAT[quant])
