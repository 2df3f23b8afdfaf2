"""torch.distributed all_reduce as a Collective (`--collective gloo`): the baseline the gRPC star
is measured against, and the path for clusters where every node can reach every other directly."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from tpi_node.comm.codec import wire_dtype
from tpi_node.comm.collective import Collective


class GlooCollective(Collective):
    """all_reduce(SUM) over a gloo process group. `init_method` is a torch.distributed URL, e.g.
    tcp://MASTER:29500 (every rank must reach it); rank 0 is the master."""

    def __init__(
        self,
        init_method: str,
        rank: int,
        world_size: int,
        wire: str | torch.dtype = "fp32",
        timeout_s: float = 30.0,
        backend: str = "gloo",
        lazy: bool = False,
    ) -> None:
        super().__init__()
        self.rank, self.world_size, self.wire = rank, world_size, wire_dtype(wire)
        self._init = dict(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self._owns_group = False
        if not lazy:
            self._connect()

    def _connect(self) -> None:
        if not dist.is_initialized():
            dist.init_process_group(**self._init)
            self._owns_group = True

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():  # lazy: every rank meets here in the first step
            self._connect()
        buf = t.detach().to("cpu", self.wire, copy=True)  # summed in place, on the wire dtype
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.stats.bytes_sent += buf.numel() * buf.element_size()
        return buf.to(t.device, t.dtype)

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
