"""The GPU Collective: one process per GPU inside one NVLink domain.

    allreduce(t)                  NCCL all_reduce (torch.distributed), or torch's symmetric-memory
                                  multimem allreduce when detection found multicast
    allreduce_add_norm(p, r, w)   world 1: fused Triton add+RMSNorm (gpu/fused.py)
                                  multimem: one Triton kernel does reduce + add + RMSNorm + store
                                  to every GPU (gpu/triton_multimem.py), between two barriers
                                  otherwise: NCCL all_reduce, then the fused add+RMSNorm kernel

The engine (or a test) starts one process per GPU and calls `init_nccl` in each, then builds
`NcclCollective(detect())`. Every rank calls the same collectives in the same order.
Imports of torch.distributed, symmetric memory and triton happen only when used.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tpi_node.comm.collective import Collective
from tpi_node.gpu import fused
from tpi_node.gpu.detect import GpuDecision

log = logging.getLogger("tpi_node.gpu")


def init_nccl(rank: int, world_size: int, init_method: str) -> None:
    """Join the NCCL process group; this process drives GPU `rank % device_count`."""
    import torch.distributed as dist

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size, device_id=device)


@dataclass
class _Workspace:
    """Symmetric buffers [3, max_tokens, H] (P = partials, X = x_new, H = h), one per stream."""

    buf: torch.Tensor
    handle: object  # torch _SymmetricMemory
    channel: int  # barrier channel: two streams must not share one
    mc_base: int  # multicast byte address of buf

    def mc(self, which: int) -> int:
        return self.mc_base + which * self.buf[0].numel() * self.buf.element_size()


class NcclCollective(Collective):
    """Allreduce over torch.distributed NCCL (default group unless `group` is given)."""

    def __init__(self, decision: GpuDecision, group=None, max_tokens: int = 8192) -> None:
        super().__init__()
        import torch.distributed as dist

        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.multimem = decision.collective == "multimem" and self.world_size > 1
        self.max_tokens = max_tokens
        self._workspaces: dict[tuple[int, int], _Workspace] = {}
        if self.multimem:
            self._group_name = (group or dist.group.WORLD).group_name
            try:  # needed by torch < 2.9, a no-op or absent later
                from torch.distributed._symmetric_memory import enable_symm_mem_for_group

                enable_symm_mem_for_group(self._group_name)
            except Exception:
                pass

    # -- plain allreduce ---------------------------------------------------------------------
    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks. NCCL reduces `t` in place and returns it; multimem returns a copy."""
        if self.world_size == 1:
            return t
        ws = self._workspace(t) if self._multimem_fits(t) else None
        if ws is None:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
            return t
        view = ws.buf[0].view(-1)[: t.numel()]
        view.copy_(t.reshape(-1))
        torch.ops.symm_mem.multimem_all_reduce_(view, "sum", self._group_name)
        return view.view(t.shape).clone()

    # -- allreduce + residual + RMSNorm ------------------------------------------------------
    def allreduce_add_norm(self, partial, residual, norm_weight, eps):
        t0 = time.perf_counter()  # host time: the GPU work is only enqueued here
        if self.world_size == 1:
            out = fused.add_rms_norm(partial, residual, norm_weight, eps)
        elif self._multimem_fits(partial) and self._fused_multimem_fits(residual, norm_weight):
            out = self._multimem_add_norm(partial, residual, norm_weight, eps)
        else:
            out = fused.add_rms_norm(self.allreduce(partial), residual, norm_weight, eps)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        return out

    def _multimem_add_norm(self, partial, residual, weight, eps):
        from tpi_node.gpu import triton_multimem

        T, H = residual.shape
        ws = self._workspace(partial)
        ws.buf[0, :T].copy_(partial)
        ws.handle.barrier(channel=ws.channel)  # every rank's partial is in place
        triton_multimem.multimem_add_rms_norm(
            ws.mc(0), ws.mc(1), ws.mc(2), residual, weight, eps, self.rank, self.world_size
        )
        ws.handle.barrier(channel=ws.channel)  # every row was stored to every rank
        return ws.buf[1, :T].clone(), ws.buf[2, :T].clone()

    # -- eligibility and buffers ---------------------------------------------------------------
    def _multimem_fits(self, t: torch.Tensor) -> bool:
        return (
            self.multimem
            and t.is_cuda
            and t.dtype == torch.bfloat16
            and t.dim() == 2
            and t.shape[0] <= self.max_tokens
            and t.shape[1] % 8 == 0
        )

    def _fused_multimem_fits(self, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            fused.triton_kernels() is not None
            and residual.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16
            and residual.stride(-1) == 1
            and weight.is_contiguous()
        )

    def _workspace(self, t: torch.Tensor) -> _Workspace:
        """Per (stream, hidden) buffers; created collectively on first use (same order on all
        ranks, since every rank runs the same schedule)."""
        import torch.distributed._symmetric_memory as symm_mem

        key = (torch.cuda.current_stream().cuda_stream, t.shape[-1])
        ws = self._workspaces.get(key)
        if ws is None:
            buf = symm_mem.empty((3, self.max_tokens, t.shape[-1]), dtype=torch.bfloat16, device=t.device)
            handle = symm_mem.rendezvous(buf, self._group_name)
            ws = _Workspace(buf, handle, len(self._workspaces), int(handle.multicast_ptr))
            self._workspaces[key] = ws
        return ws

    def close(self) -> None:
        self._workspaces.clear()
