"""Triton kernel: residual add + RMSNorm in one pass (world size 1, or after the allreduce).

Imports triton at module level: import this module only through `gpu.fused`, which checks first.

One program per row (token): the whole row (hidden <= MAX_HIDDEN = 16384, one block) is read once, summed in
fp32, rounded like the torch reference, and both outputs are written once:
    x_new[t] = bf16(residual[t] + partial[t])                 # [H]
    h[t]     = weight * bf16(x_new[t] * rsqrt(mean(x_new[t]^2) + eps))
Bytes per row: read partial, residual (weight stays in L2), write x_new and h: 4 * H * 2.
The unfused torch version makes ~7 passes over fp32/bf16 intermediates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 16384


@triton.jit
def _add_rms_norm_kernel(
    p_ptr,
    r_ptr,
    w_ptr,
    x_ptr,
    h_ptr,
    stride_p,
    stride_r,
    stride_x,
    stride_h,
    H,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    p = tl.load(p_ptr + row * stride_p + cols, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
    # Round the sum to the residual dtype first: torch computes `residual + partial` in that dtype.
    x = (r.to(tl.float32) + p.to(tl.float32)).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    # Reference: weight * (x * rstd).to(x.dtype) -> the normalised row is rounded before scaling.
    n = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * stride_h + cols, (n * w).to(h_ptr.dtype.element_ty), mask=mask)


def launch_config(hidden: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the whole row in one block, ~16 bytes per thread per load or more."""
    block = triton.next_power_of_2(hidden)
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def add_rms_norm(
    partial: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    x_out: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """partial, residual: [T, H] (last dim contiguous); weight: [H]. Returns (x_new, h)."""
    T, H = residual.shape
    x_out = torch.empty_like(residual) if x_out is None else x_out
    if h_out is None:
        h_out = torch.empty((T, H), dtype=torch.promote_types(residual.dtype, weight.dtype), device=residual.device)
    if T == 0:
        return x_out, h_out
    block, warps = launch_config(H)
    _add_rms_norm_kernel[(T,)](
        partial,
        residual,
        weight,
        x_out,
        h_out,
        partial.stride(0),
        residual.stride(0),
        x_out.stride(0),
        h_out.stride(0),
        H,
        eps,
        BLOCK=block,
        num_warps=warps,
    )
    return x_out, h_out
