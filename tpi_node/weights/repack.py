"""GGUF block types the kernels do not read as stored, repacked exactly into ones they do.

- K-quants (Q4_K, Q6_K) hold 256 weights a super-block with a scale per 32 (Q4_K) or per 16 (Q6_K)
  weights. The plan cuts a matrix's columns at multiples of 32 (head dims, FFN blocks), and the
  kernels work on 32-weight blocks, so each 32-weight sub-block becomes a block of its own
  (model/quant.py's q4_k and q6_k; model/qmatmul.c has the byte layout), carrying the super-block's
  fp16 scales and its own sub-block scales: 22 bytes per 32 weights for Q4_K (the file: 18), 36 for
  Q6_K (the file: 26.25).
- Q5_0 and Q5_1 (what llama.cpp falls back to where a K-quant does not fit: a Q4_K_M file of a model
  whose rows are not a multiple of 256 weights, such as SmolLM2's 576, is mostly Q5_0) become q8_mix
  blocks (40 bytes per 32 weights; the file: 22 and 24): their 5-bit values as int8.

Dequantised, a repacked block gives what gguf-py (what transformers uses) gives for the same bytes,
bit for bit (tests/test_quant.py).

    repack("Q4_K", raw)   # uint8 [rows, K / 256 * 144] -> uint8 [rows, K / 32, 22]
"""

from __future__ import annotations

import numpy as np
import torch

from tpi_node.model.quant import mixed_blocks

SUPER = 256  # weights per K-quant super-block


def _q4_k(raw: np.ndarray) -> np.ndarray:
    """Q4_K super-block (144 bytes): f16 d, f16 dmin, 12 bytes packing eight 6-bit scales and
    eight 6-bit mins, then 128 bytes: 32 bytes per pair of sub-blocks (2c in the low nibbles, 2c + 1
    in the high ones, weight i in byte i)."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 144)
    ns = b.shape[1]
    s = b[..., 4:16].reshape(rows, ns, 3, 4)  # rows of 4 bytes: low bits of sc, of mn, then the rest
    sc = np.concatenate([s[..., 0, :] & 0x3F, (s[..., 2, :] & 0x0F) | ((s[..., 0, :] >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([s[..., 1, :] & 0x3F, (s[..., 2, :] >> 4) | ((s[..., 1, :] >> 2) & 0x30)], axis=-1)
    qs = b[..., 16:].reshape(rows, ns, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    q = (qs & 15).reshape(rows, ns, 8, 32)  # sub-block j's 32 values in order
    out = np.empty((rows, ns, 8, 22), np.uint8)
    out[..., 0:4] = b[:, :, None, 0:4]  # d, dmin
    out[..., 4], out[..., 5] = sc, mn
    out[..., 6:] = q[..., :16] | (q[..., 16:] << 4)  # byte j: weight j low, weight j + 16 high
    return out.reshape(rows, ns * 8, 22)


def _q6_k(raw: np.ndarray) -> np.ndarray:
    """Q6_K super-block (210 bytes): 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales
    (one per 16 weights), f16 d. Per half of 128 weights: the low nibbles of its 64 ql bytes, then
    their high nibbles; the 2-bit pieces of its 32 qh bytes at shifts 0, 2, 4, 6."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 210)
    ns = b.shape[1]
    ql = b[..., :128].reshape(rows, ns, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    qh = b[..., 128:192].reshape(rows, ns, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    q = ((ql & 15).reshape(rows, ns, 8, 32) | ((qh & 3).reshape(rows, ns, 8, 32) << 4)).astype(np.int8) - 32
    out = np.empty((rows, ns, 8, 36), np.uint8)
    out[..., 0:2] = b[:, :, None, 208:210]  # d
    out[..., 2:4] = b[..., 192:208].reshape(rows, ns, 8, 2)  # the scales of weights 0..15 and 16..31
    out[..., 4:] = q.view(np.uint8)
    return out.reshape(rows, ns * 8, 36)


def _q5(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """Q5_0 (22 bytes: f16 d, 32 high bits, 16 bytes of low nibbles; w = d (q - 16)) and Q5_1 (24
    bytes: f16 d, f16 m, then the same; w = d q + m) as q8_mix blocks. Weight j's low 4 bits are
    byte j's low nibble (j < 16) or byte j - 16's high one; its fifth bit is bit j of the
    little-endian 32-bit word."""
    rows = raw.shape[0]
    size = 24 if with_min else 22
    b = raw.reshape(rows, -1, size)
    at = 4 if with_min else 2
    high = np.ascontiguousarray(b[..., at : at + 4]).view("<u4") >> np.arange(32, dtype=np.uint32)  # [rows, nb, 32]
    qs = b[..., at + 4 :]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1) | ((high & 1).astype(np.uint8) << 4)
    t = torch.from_numpy
    if not with_min:  # d (q - 16)
        return mixed_blocks(t(b[..., 0:2].copy()), t(q.astype(np.int8) - 16)).data.numpy()
    neg_m = t(-np.ascontiguousarray(b[..., 2:4]).view(np.float16)).view(torch.uint8)  # d q + m: dmin = -m, mn = 1
    return mixed_blocks(t(b[..., 0:2].copy()), t(q.astype(np.int8)), None, neg_m, 1).data.numpy()


# GGUF type -> (repacking, the block format it is served in)
REPACK = {
    "Q4_K": (_q4_k, "q4_k"),
    "Q6_K": (_q6_k, "q6_k"),
    "Q5_0": (lambda raw: _q5(raw, False), "q8_mix"),
    "Q5_1": (lambda raw: _q5(raw, True), "q8_mix"),
}


def repack(gguf_type: str, raw: np.ndarray) -> np.ndarray:
    """Rows of such a tensor (uint8 [rows, bytes a row]) as 32-weight blocks [rows, K/32, bytes]."""
    return REPACK[gguf_type][0](np.ascontiguousarray(raw))
