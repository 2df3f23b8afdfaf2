"""The GPU Collective: one process per GPU inside one NVLink domain.

    allreduce(t)                  NCCL all_reduce (torch.distributed), or torch's symmetric-memory
                                  multimem allreduce when detection found multicast
    allreduce_add_norm(p, r, w)   world 1: fused Triton add+RMSNorm (gpu/fused.py)
                                  multimem: one Triton kernel does reduce + add + RMSNorm + store
                                  to every GPU (gpu/triton_multimem.py), between two barriers
                                  otherwise: NCCL all_reduce, then the fused add+RMSNorm kernel
    split_at(T), split_streams()  steps of >= split_threshold tokens run as two halves on two CUDA
                                  streams (gpu/split.py), so one half's allreduce overlaps the
                                  other half's compute

commands/compose.py builds it for the ranks of a plan that are GPUs of one NVLink domain: each
rank passes its `GroupInit` and joins the process group in its first collective (every rank meets
there), as the gloo ring does. With backend "gloo" the same code runs on CPU tensors (the tests);
the multimem kernel and the CUDA streams are then never used. Every rank calls the same
collectives in the same order. torch.distributed, symmetric memory and triton are imported only
when used.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

import torch

from tpi_node.comm.collective import Collective
from tpi_node.gpu import fused
from tpi_node.gpu.detect import GpuDecision
from tpi_node.gpu.split import DEFAULT_THRESHOLD, split_point

log = logging.getLogger("tpi_node.gpu")


@dataclass(frozen=True)
class GroupInit:
    """How one rank joins the process group: a torch.distributed URL every rank reaches."""

    init_method: str  # tcp://HOST:PORT
    rank: int
    world_size: int
    backend: str = "nccl"  # "gloo": the same collective over CPU tensors (tests)
    device: str | None = None  # the GPU this process drives (NCCL); default cuda:(rank % count)
    timeout_s: float = 60.0


def init_group(g: GroupInit) -> None:
    """Join the process group (blocks until every rank has)."""
    import torch.distributed as dist

    kw = {}
    if g.backend == "nccl":
        device = torch.device(g.device or f"cuda:{g.rank % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
        kw["device_id"] = device
    dist.init_process_group(
        g.backend,
        init_method=g.init_method,
        rank=g.rank,
        world_size=g.world_size,
        timeout=datetime.timedelta(seconds=g.timeout_s),
        **kw,
    )


def init_nccl(rank: int, world_size: int, init_method: str) -> None:
    """Join the NCCL process group; this process drives GPU `rank % device_count`."""
    init_group(GroupInit(init_method, rank, world_size))


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
    """Allreduce over a torch.distributed group: the one `init` joins (lazily, in the first
    collective), else the group already there (`group`, default WORLD; world 1 without one)."""

    def __init__(
        self,
        decision: GpuDecision,
        group=None,
        max_tokens: int = 8192,
        *,
        init: GroupInit | None = None,
        split_threshold: int = DEFAULT_THRESHOLD,
    ) -> None:
        super().__init__()
        self.decision, self.group, self.max_tokens = decision, group, max_tokens
        self.split_threshold = split_threshold  # 0: never split
        self.backend = init.backend if init is not None else "nccl"
        self.multimem = False
        self._init = init
        self._owns_group = False
        self._group_name = ""
        self._streams = None
        self._workspaces: dict[tuple[int, int], _Workspace | None] = {}
        if init is not None:  # known now, connected in the first collective
            self.rank, self.world_size = init.rank, init.world_size
        else:
            self._connected()

    def _connect(self) -> None:
        import torch.distributed as dist

        if self._init is not None:
            want, self._init = self._init, None
            if not dist.is_initialized():
                init_group(want)
                self._owns_group = True
            self._connected()
            if (self.rank, self.world_size) != (want.rank, want.world_size):
                raise RuntimeError(
                    f"this process is rank {self.rank} of a group of {self.world_size} already, not rank "
                    f"{want.rank} of {want.world_size}: a plan with other nodes needs a new process group"
                )

    def _connected(self) -> None:
        import torch.distributed as dist

        self.world_size = dist.get_world_size(self.group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        self.multimem = self.decision.collective == "multimem" and self.world_size > 1 and self.backend == "nccl"
        if self.multimem:
            self._group_name = (self.group or dist.group.WORLD).group_name
            try:  # needed by torch < 2.9, a no-op or absent later
                from torch.distributed._symmetric_memory import enable_symm_mem_for_group

                enable_symm_mem_for_group(self._group_name)
            except Exception:
                pass

    # -- plain allreduce ---------------------------------------------------------------------
    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks. NCCL reduces `t` in place and returns it; multimem returns a copy."""
        self._connect()
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
        self._connect()
        t0 = time.perf_counter()  # host time: the GPU work is only enqueued here
        out = None
        if self.world_size == 1:
            out = fused.add_rms_norm(partial, residual, norm_weight, eps)
        elif self._multimem_fits(partial) and self._fused_multimem_fits(residual, norm_weight):
            out = self._multimem_add_norm(partial, residual, norm_weight, eps)
        if out is None:
            out = fused.add_rms_norm(self.allreduce(partial), residual, norm_weight, eps)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        return out

    def _multimem_add_norm(self, partial, residual, weight, eps):
        """None when the group has no multicast mapping after all (the caller uses NCCL)."""
        ws = self._workspace(partial)
        if ws is None:
            return None
        from tpi_node.gpu import triton_multimem

        T = residual.shape[0]
        ws.buf[0, :T].copy_(partial)
        ws.handle.barrier(channel=ws.channel)  # every rank's partial is in place
        triton_multimem.multimem_add_rms_norm(
            ws.mc(0), ws.mc(1), ws.mc(2), residual, weight, eps, self.rank, self.world_size
        )
        ws.handle.barrier(channel=ws.channel)  # every row was stored to every rank
        return ws.buf[1, :T].clone(), ws.buf[2, :T].clone()

    # -- token split ---------------------------------------------------------------------------
    def split_at(self, n_tokens: int) -> int:
        if self.world_size < 2 or self.split_threshold <= 0:
            return 0
        return split_point(n_tokens, sm_count=max(1, self.decision.sm_count), threshold=self.split_threshold)

    def split_streams(self):
        if self.backend != "nccl" or not torch.cuda.is_available():
            return None
        if self._streams is None:
            self._connect()  # every rank is here in the same step; the group sets this GPU current
            self._streams = (torch.cuda.Stream(), torch.cuda.Stream())
        return self._streams

    # -- eligibility and buffers ---------------------------------------------------------------
    def _multimem_fits(self, t: torch.Tensor) -> bool:
        return (
            self.multimem
            and t.is_cuda
            and t.dtype == torch.bfloat16
            and t.dim() == 2
            and 0 < t.shape[0] <= self.max_tokens
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

    def _workspace(self, t: torch.Tensor) -> _Workspace | None:
        """Per (stream, hidden) buffers; created collectively on first use (same order on all
        ranks, since every rank runs the same schedule). None, and no multimem from then on,
        when the group got no multicast mapping: torch's rendezvous degrades the whole group to
        unicast (multicast_ptr 0) when any rank fails to bind, and a multimem instruction on an
        address outside a multicast mapping faults (torch's own ops check this before launching)."""
        import torch.distributed._symmetric_memory as symm_mem

        key = (torch.cuda.current_stream().cuda_stream, t.shape[-1])
        if key not in self._workspaces:
            buf = symm_mem.empty((3, self.max_tokens, t.shape[-1]), dtype=torch.bfloat16, device=t.device)
            handle = symm_mem.rendezvous(buf, self._group_name)
            # The handle of `buf` itself: its multicast_ptr is buf's own multicast address (torch
            # adds the handle's offset in the block; buf starts a block of its own, offset 0).
            mc = int(getattr(handle, "multicast_ptr", 0) or 0)
            if mc == 0:
                log.warning("gpu: symmetric memory has no multicast mapping here: NCCL allreduce instead")
                self.multimem = False
                self._workspaces[key] = None
            else:
                self._workspaces[key] = _Workspace(buf, handle, len(self._workspaces), mc)
        return self._workspaces[key]

    def close(self) -> None:
        self._workspaces.clear()
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
