"""The Collective interface: the only place where nodes meet during a forward pass.

Every node (master and workers) calls the same collectives in the same order with tensors of
the same shape. `allreduce_add_norm` is the one the forward loop uses:

    x_new = residual + sum_over_nodes(partial)     # [T, hidden]
    h     = rms_norm(x_new, norm_weight, eps)       # [T, hidden]

Implementations: LocalCollective (one node; `fused=True` on a CUDA node: the fused add+RMSNorm
kernel of gpu/fused.py), the gRPC star (comm/star.py), gloo (comm/torch_dist.py), and the NCCL
collective of GPUs in one NVLink domain (comm/nccl.py). commands/compose.py picks one.

The async form, for the token split (engine/runner.py): `start_add_norm` begins one (the partial
leaves), `wait_add_norm` later gives (x, h), so the forward loop computes the other half of the
step in between. Only an `AsyncCollective` (the star) really overlaps; every other collective
completes in `start_add_norm`. Every node starts and waits in the same order.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from tpi_node.errors import TpiError
from tpi_node.model.layers import add_rms_norm


@dataclass
class CommStats:
    """Seconds spent inside collectives (wire + waiting for the slowest peer), and how many."""

    seconds: float = 0.0
    calls: int = 0
    bytes_sent: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes_sent = 0.0, 0, 0


@dataclass
class InFlight:
    """An allreduce_add_norm begun by `start_add_norm` and not yet waited for."""

    handle: Any  # the collective's own token for the allreduce in flight
    residual: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0
    result: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, h) once known


class Collective(ABC):
    """Sum of a tensor across all nodes of the plan. Subclasses implement `allreduce`."""

    world_size: int = 1
    rank: int = 0

    def __init__(self) -> None:
        self.stats = CommStats()

    @abstractmethod
    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of `t` over all nodes; every node gets the sum."""

    def gather(self, t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor] | None:
        """Rank r's 1-D float32 `t` of sizes[r] values -> on rank 0, every rank's in rank order;
        None on the others. Exact: the values arrive as sent (the split head's candidates). One
        node has nothing to gather; the star sends them (comm/star.py); other collectives do not
        gather (--head-split keeps the head whole on them)."""
        if self.world_size > 1:  # choose_head_split (engine/vocab.py) never splits the head on one
            raise TpiError(f"{type(self).__name__} has no exact gather: the split head needs the star")
        return [t.float().cpu()]

    def begin_step(self, step_id: int) -> None:
        """A new forward step starts: collectives that tag their frames (the star) restart
        their count; the others ignore it."""

    def split_at(self, n_tokens: int) -> int:
        """Where the forward loop cuts a step of n_tokens in two halves whose communication and
        compute overlap (gpu/split.py), or 0: do not split. Every rank gets the same answer."""
        return 0

    def split_streams(self):
        """The two CUDA streams the halves of a split step run on, or None (inline)."""
        return None

    def reduce_partial(self, partial: torch.Tensor) -> torch.Tensor:
        """allreduce, counted in `stats`: what the one-call decode loop (model/decode_ops.py) asks
        after each half layer, adding and norming the sum itself."""
        t0 = time.perf_counter()
        total = self.allreduce(partial)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        return total

    def allreduce_add_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(residual, self.reduce_partial(partial), norm_weight, eps)

    def start_add_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
    ) -> InFlight:
        """Begin allreduce_add_norm; a collective without an async form completes it here."""
        return InFlight(None, result=self.allreduce_add_norm(partial, residual, norm_weight, eps))

    def wait_add_norm(self, f: InFlight) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, h) of an allreduce_add_norm begun by `start_add_norm`."""
        return f.result

    def close(self) -> None:
        pass


class AsyncCollective(Collective):
    """A collective whose allreduce is begun and waited for apart: `allreduce_start` sends the
    partial and returns at once, `allreduce_wait` gives the sum. Waits come in start order."""

    @abstractmethod
    def allreduce_start(self, t: torch.Tensor) -> Any:
        """Send this node's part of the next allreduce -> a handle for `allreduce_wait`."""

    @abstractmethod
    def allreduce_wait(self, handle: Any) -> torch.Tensor:
        """The sum of the allreduce `handle` began (every earlier one is complete after it)."""

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.allreduce_wait(self.allreduce_start(t))

    def start_add_norm(self, partial, residual, norm_weight, eps) -> InFlight:
        t0 = time.perf_counter()
        f = InFlight(self.allreduce_start(partial), residual, norm_weight, eps)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        return f

    def wait_add_norm(self, f: InFlight) -> tuple[torch.Tensor, torch.Tensor]:
        if f.result is None:
            t0 = time.perf_counter()
            total = self.allreduce_wait(f.handle)
            self.stats.seconds += time.perf_counter() - t0
            f.result, f.residual = add_rms_norm(f.residual, total, f.norm_weight, f.eps), None
        return f.result


class LocalCollective(Collective):
    """One node holds the whole model: the sum over nodes is the partial itself. `fused`: the
    residual add + RMSNorm run as one Triton kernel where it applies (a CUDA node, gpu/fused.py)."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def allreduce_add_norm(self, partial, residual, norm_weight, eps):
        if not self.fused:
            return super().allreduce_add_norm(partial, residual, norm_weight, eps)
        from tpi_node.gpu import fused  # only a CUDA node's collective is fused: a CPU one never imports gpu/

        self.stats.calls += 1
        return fused.add_rms_norm(partial, residual, norm_weight, eps)
