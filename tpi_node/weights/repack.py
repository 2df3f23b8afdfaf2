"""GGUF block types the kernels do not read as stored, repacked exactly into ones they do.

- K-quants (Q4_K, Q6_K) hold 256 weights a super-block with a scale per 32 (Q4_K) or per 16 (Q6_K)
  weights. The plan cuts a matrix's columns at multiples of 32 (head dims, FFN blocks), and the
  kernels work on 32-weight blocks, so each 32-weight sub-block becomes a block of its own
  (model/quant.py's q4_k and q6_k; model/qmatmul.c has the byte layout), carrying the super-block's
  fp16 scales and its own sub-block scales: 23 bytes per 32 weights for Q4_K (the file: 18), 36 for
  Q6_K (the file: 26.25).

Dequantised, a repacked block gives what gguf-py (what transformers uses) gives for the same bytes,
bit for bit (tests/test_quant.py).

    repack("Q4_K", raw)   # uint8 [rows, K / 256 * 144] -> uint8 [rows, K / 32, 23]
"""

from __future__ import annotations

import numpy as np


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
    out = np.zeros((rows, ns, 8, 23), np.uint8)
    out[..., 0:4] = b[:, :, None, 0:4]  # d, dmin
    out[..., 4], out[..., 5] = sc, mn  # byte 6: 0 (23 bytes: 22 is Q5_0's size, which names it)
    out[..., 7:] = q[..., :16] | (q[..., 16:] << 4)  # byte j: weight j low, weight j + 16 high
    return out.reshape(rows, ns * 8, 23)


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


# GGUF type -> (repacking, the block format it is served in)
REPACK = {
    "Q4_K": (_q4_k, "q4_k"),
    "Q6_K": (_q6_k, "q6_k"),
}


def repack(gguf_type: str, raw: np.ndarray) -> np.ndarray:
    """Rows of such a tensor (uint8 [rows, bytes a row]) as 32-weight blocks [rows, K/32, bytes]."""
    return REPACK[gguf_type][0](np.ascontiguousarray(raw))
