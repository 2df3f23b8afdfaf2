"""Triton kernel: allreduce + residual add + RMSNorm over NVLink multicast (symmetric memory).

Imports triton at module level: import it only through `comm/nccl.py`, after detection said
'multimem'. Needs several Hopper GPUs on NVSwitch with multicast; a single GPU cannot run it.

Every rank has copied its partial [T, H] (bf16) into a symmetric buffer P and passed a barrier.
Rank r owns rows r, r + W, r + 2W, ... For each owned row, one program:
  1. multimem.ld_reduce ... add.v4.bf16x2 on P's multicast address: the switch returns the sum
     over all ranks, 16 bytes (8 bf16) per instruction, [BV] chunks of the row;
  2. x_new = bf16(residual + sum); h = weight * bf16(x_new * rsqrt(mean(x_new^2) + eps));
  3. multimem.st of x_new and h to the multicast addresses of X and H: every rank receives them.
After a second barrier every rank reads all T rows of X and H locally.

A row is handled as 8 tensors of shape [BV] (BV = H / 8 chunks): element e of chunk j is
row[8 j + e]; word k of an ld_reduce result holds elements 2k (low half) and 2k+1 (high half).

EMULATE=True replaces the two multimem instructions by plain loads and stores over W stacked
copies of the buffers (int32 words), so the index and packing logic runs in Triton's CPU
interpreter (TRITON_INTERPRET=1) and is tested without NVSwitch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A masked-off lane branches around the multimem instruction instead of predicating it: ptxas
# 12.8/12.9 (Triton 3.6's) compiles `@p multimem.st` to an unconditional STG.E.128 (the
# predicate is dropped), so masked lanes stored 16 bytes at their address anyway: past the row
# end when H / 8 is not a power of two, and at address 0 in a launch with every lane masked off
# (the illegal address of 2026-11-26). A branch (torch's kernel skips such lanes the same way)
# keeps them out with every ptxas; tests/test_gpu_cpu.py checks the SASS.
_LD_REDUCE = tl.constexpr("""{
  .reg .pred %mm_p;
  mov.u32 $0, 0; mov.u32 $1, 0; mov.u32 $2, 0; mov.u32 $3, 0;
  setp.eq.s32 %mm_p, $5, 0;
  @%mm_p bra mm_skip;
  multimem.ld_reduce.relaxed.sys.global.add.v4.bf16x2 {$0, $1, $2, $3}, [$4];
  mm_skip:
}""")

_ST = tl.constexpr("""{
  .reg .pred %mm_p;
  mov.u32 $0, 0;
  setp.eq.s32 %mm_p, $6, 0;
  @%mm_p bra mm_skip;
  multimem.st.relaxed.sys.global.v4.f32 [$1], {$2, $3, $4, $5};
  mm_skip:
}""")


@triton.jit
def _lo(word):
    return (word & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _hi(word):
    return (word >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _pack(lo, hi):
    lo16 = lo.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hi16 = hi.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return lo16 | (hi16 << 16)


@triton.jit
def _emu_word_sum(emu_ptr, emu_stride, word_idx, mask, world):
    """Emulated ld_reduce of one bf16x2 word: fp32 sum over the W copies, rounded to bf16."""
    acc_lo = tl.zeros(word_idx.shape, tl.float32)
    acc_hi = tl.zeros(word_idx.shape, tl.float32)
    for s in range(world):
        w = tl.load(emu_ptr + s * emu_stride + word_idx, mask=mask, other=0).to(tl.uint32, bitcast=True)
        acc_lo += _lo(w).to(tl.float32)
        acc_hi += _hi(w).to(tl.float32)
    return _pack(acc_lo, acc_hi)


@triton.jit
def _ld_reduce(mc_base, emu_ptr, emu_stride, elem_idx, mask, world, EMULATE: tl.constexpr):
    """Sum over ranks of 8 bf16 at element index elem_idx (multiple of 8): 4 uint32 words."""
    if EMULATE:
        w = elem_idx // 2
        w0 = _emu_word_sum(emu_ptr, emu_stride, w + 0, mask, world)
        w1 = _emu_word_sum(emu_ptr, emu_stride, w + 1, mask, world)
        w2 = _emu_word_sum(emu_ptr, emu_stride, w + 2, mask, world)
        w3 = _emu_word_sum(emu_ptr, emu_stride, w + 3, mask, world)
    else:
        addr = mc_base + elem_idx * 2  # bytes, bf16
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            _LD_REDUCE,
            "=r,=r,=r,=r,l,r",
            [addr, mask.to(tl.int32)],
            dtype=(tl.uint32, tl.uint32, tl.uint32, tl.uint32),
            is_pure=False,
            pack=1,
        )
    return w0, w1, w2, w3


@triton.jit
def _st(mc_base, emu_ptr, emu_stride, elem_idx, mask, world, w0, w1, w2, w3, EMULATE: tl.constexpr):
    """Store 4 words (8 bf16) at elem_idx in every rank's buffer."""
    if EMULATE:
        w = elem_idx // 2
        for s in range(world):
            base = emu_ptr + s * emu_stride + w
            tl.store(base + 0, w0.to(tl.int32, bitcast=True), mask=mask)
            tl.store(base + 1, w1.to(tl.int32, bitcast=True), mask=mask)
            tl.store(base + 2, w2.to(tl.int32, bitcast=True), mask=mask)
            tl.store(base + 3, w3.to(tl.int32, bitcast=True), mask=mask)
    else:
        addr = mc_base + elem_idx * 2
        tl.inline_asm_elementwise(
            _ST, "=r,l,r,r,r,r,r", [addr, w0, w1, w2, w3, mask.to(tl.int32)], dtype=tl.uint32, is_pure=False, pack=1
        )


@triton.jit
def _x_and_sq(r_ptr, offs, mask, s):
    """x = bf16(residual + s) for one element of each chunk, and its fp32 square."""
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = (r + s.to(tl.float32)).to(tl.bfloat16)
    xf = x.to(tl.float32)
    return x, xf * xf


@triton.jit
def _norm(x, w_ptr, cols, mask, rstd):
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (((x.to(tl.float32) * rstd).to(tl.bfloat16)).to(tl.float32) * w).to(tl.bfloat16)


@triton.jit
def _multimem_add_rms_norm_kernel(
    mc_p,
    mc_x,
    mc_h,  # multicast byte addresses (int64) of P, X, H
    emu_p,
    emu_x,
    emu_h,
    emu_stride,  # EMULATE only: int32 words [W, T_max * H / 2]
    r_ptr,
    stride_r,
    w_ptr,
    T,
    H,
    eps,
    rank,
    world,
    BV: tl.constexpr,
    EMULATE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * world + rank
    if row < T:
        j = tl.arange(0, BV)
        mask = j < H // 8
        elem = row * H + j * 8  # [BV] first element of each 16-byte chunk
        cols = j * 8  # [BV] same, within the row
        w0, w1, w2, w3 = _ld_reduce(mc_p, emu_p, emu_stride, elem, mask, world, EMULATE)
        rrow = r_ptr + row * stride_r + cols
        x0, q0 = _x_and_sq(rrow, 0, mask, _lo(w0))
        x1, q1 = _x_and_sq(rrow, 1, mask, _hi(w0))
        x2, q2 = _x_and_sq(rrow, 2, mask, _lo(w1))
        x3, q3 = _x_and_sq(rrow, 3, mask, _hi(w1))
        x4, q4 = _x_and_sq(rrow, 4, mask, _lo(w2))
        x5, q5 = _x_and_sq(rrow, 5, mask, _hi(w2))
        x6, q6 = _x_and_sq(rrow, 6, mask, _lo(w3))
        x7, q7 = _x_and_sq(rrow, 7, mask, _hi(w3))
        sq = tl.sum(q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7, axis=0)
        rstd = 1.0 / tl.sqrt(sq / H + eps)
        _st(
            mc_x,
            emu_x,
            emu_stride,
            elem,
            mask,
            world,
            _pack(x0, x1),
            _pack(x2, x3),
            _pack(x4, x5),
            _pack(x6, x7),
            EMULATE,
        )
        h0 = _norm(x0, w_ptr, cols + 0, mask, rstd)
        h1 = _norm(x1, w_ptr, cols + 1, mask, rstd)
        h2 = _norm(x2, w_ptr, cols + 2, mask, rstd)
        h3 = _norm(x3, w_ptr, cols + 3, mask, rstd)
        h4 = _norm(x4, w_ptr, cols + 4, mask, rstd)
        h5 = _norm(x5, w_ptr, cols + 5, mask, rstd)
        h6 = _norm(x6, w_ptr, cols + 6, mask, rstd)
        h7 = _norm(x7, w_ptr, cols + 7, mask, rstd)
        _st(
            mc_h,
            emu_h,
            emu_stride,
            elem,
            mask,
            world,
            _pack(h0, h1),
            _pack(h2, h3),
            _pack(h4, h5),
            _pack(h6, h7),
            EMULATE,
        )


def grid_and_block(T: int, H: int, world: int) -> tuple[tuple[int], int, int]:
    """One program per owned row; [BV] 16-byte chunks per row, at most one per thread where the
    row allows (a thread holding a copy of another's chunk would repeat its multimem ops)."""
    bv = triton.next_power_of_2(max(H // 8, 1))
    warps = max(1, min(8, bv // 32))
    return (triton.cdiv(T, world),), bv, warps


def check_launch(mc: tuple[int, ...], residual: torch.Tensor, weight: torch.Tensor) -> None:
    """What torch's multimem ops check before they launch: a multicast mapping (a multimem
    instruction at any other address faults the context), 16-byte alignment, bf16 rows of
    H % 8 == 0 elements."""
    T, H = residual.shape
    if any(a == 0 for a in mc):
        raise ValueError("multimem_add_rms_norm: no multicast address (symmetric memory without multicast)")
    if any(a % 16 for a in mc):
        raise ValueError(f"multimem_add_rms_norm: multicast addresses must be 16-byte aligned, got {mc}")
    if H % 8 or residual.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.shape != (H,):
        raise ValueError(f"multimem_add_rms_norm: needs bf16 rows of H % 8 == 0 elements and a bf16 [H] weight (H={H})")
    if residual.stride(1) != 1:
        raise ValueError("multimem_add_rms_norm: residual rows must be contiguous")


def multimem_add_rms_norm(
    mc_p: int, mc_x: int, mc_h: int, residual: torch.Tensor, weight: torch.Tensor, eps: float, rank: int, world: int
) -> None:
    """Launch on the current stream; P must hold every rank's partial (barrier before), and
    X, H are complete on every rank only after a barrier after. residual: [T, H] bf16, H % 8 == 0."""
    check_launch((mc_p, mc_x, mc_h), residual, weight)
    T, H = residual.shape
    if T == 0:
        return
    grid, bv, warps = grid_and_block(T, H, world)
    _multimem_add_rms_norm_kernel[grid](
        mc_p,
        mc_x,
        mc_h,
        residual,
        residual,
        residual,
        0,
        residual,
        residual.stride(0),
        weight,
        T,
        H,
        eps,
        rank,
        world,
        BV=bv,
        EMULATE=False,
        num_warps=warps,
    )


def emulated_multimem_add_rms_norm(
    emu_p: torch.Tensor,
    emu_x: torch.Tensor,
    emu_h: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    rank: int,
    world: int,
) -> None:
    """Same kernel with plain loads/stores. emu_*: int32 [W, T_max * H / 2] (bf16 pairs)."""
    T, H = residual.shape
    grid, bv, warps = grid_and_block(T, H, world)
    _multimem_add_rms_norm_kernel[grid](
        0,
        0,
        0,
        emu_p,
        emu_x,
        emu_h,
        emu_p.stride(0),
        residual,
        residual.stride(0),
        weight,
        T,
        H,
        eps,
        rank,
        world,
        BV=bv,
        EMULATE=True,
        num_warps=warps,
    )
