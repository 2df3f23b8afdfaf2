"""Fused residual add + RMSNorm: the Triton kernel where it applies, the unfused path elsewhere.

    x_new = residual + partial          # [T, H]  (partial already summed over nodes)
    h     = rms_norm(x_new, weight, eps)

`add_rms_norm` picks the kernel for CUDA tensors of a float dtype with hidden <= 16384 when Triton
imports; otherwise (CPU, no Triton, odd layouts) it runs exactly what `Collective.allreduce_add_norm`
computes (model/layers.py add_rms_norm: one C call on fp32 CPU tensors, else torch ops, which are
`add_rms_norm_reference`, the kernel's definition). Importing this module never imports triton.
"""

from __future__ import annotations

import functools

import torch

from tpi_node.model import layers
from tpi_node.model.layers import rms_norm

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def add_rms_norm_reference(
    partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused torch path (several kernels): the definition the fused kernel must match."""
    x = residual + partial.to(residual.dtype)
    return x, rms_norm(x, weight, eps)


@functools.cache
def triton_kernels():
    """The Triton module, or None when triton is not installed (CPU nodes, no `[gpu]` extra)."""
    try:
        from tpi_node.gpu import triton_add_norm
    except ImportError:
        return None
    return triton_add_norm


def kernel_applies(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the Triton kernel computes this call (else the reference does)."""
    if not (residual.is_cuda and partial.is_cuda and weight.is_cuda):
        return False
    if residual.dtype not in _FLOATS or partial.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        return False
    if partial.shape != residual.shape or weight.shape != residual.shape[-1:]:
        return False
    k = triton_kernels()
    if k is None or residual.shape[-1] > k.MAX_HIDDEN:
        return False
    return residual.stride(-1) == 1 and partial.stride(-1) == 1 and weight.is_contiguous()


def add_rms_norm(
    partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """partial, residual: [..., H]; weight: [H]. Returns (x_new, h) shaped like residual."""
    if not kernel_applies(partial, residual, weight):  # what a node without the kernel runs (C on fp32 CPU)
        return layers.add_rms_norm(residual, partial, weight, eps)
    shape = residual.shape
    # [..., H] -> [T, H]; reshape copies only if the leading dims are not viewable.
    p2, r2 = partial.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    x, h = triton_kernels().add_rms_norm(p2, r2, weight, eps)
    return x.view(shape), h.view(shape)
