"""Collectives for nodes that compute on a GPU (or MPS) but meet the others over a host wire.

DeviceHop wraps any host Collective (the gRPC star, gloo, ...): a partial computed on the device
goes device -> one reused pinned host buffer -> inner.allreduce -> device. The wire sees only CPU
tensors in one agreed wire dtype, so a CUDA node in bf16 and a CPU node in fp32 still sum the
same bytes. On a CPU node it is a pass-through.

    coll = DeviceHop(StarSpoke(...), wire_dtype=torch.float32)

InProcessGroup runs several ranks as threads of ONE process (a CPU rank and a CUDA rank on one
machine, as the device check and the tests do): every rank hands in its partial, the sum is
taken in rank order (the same bytes on every rank, as the star's master does), every rank gets it.
"""

from __future__ import annotations

import threading

import torch

from tpi_node.comm.collective import Collective


class DeviceHop(Collective):
    def __init__(self, inner: Collective, wire_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.inner, self.wire_dtype = inner, wire_dtype
        self.world_size, self.rank = inner.world_size, inner.rank
        self._host = torch.empty(0)  # pinned [T, H] wire buffer, reused while big enough

    def _buffer(self, shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
        n = shape.numel()
        if self._host.numel() < n or self._host.dtype != dtype or self._host.is_pinned() != pin:
            self._host = torch.empty(
                max(n, 2 * self._host.numel() if self._host.dtype == dtype else n), dtype=dtype, pin_memory=pin
            )
        return self._host[:n].view(shape)

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        wire = self.wire_dtype or t.dtype
        if t.device.type == "cpu":
            total = self.inner.allreduce(t if t.dtype == wire else t.to(wire))
            return total if total.dtype == t.dtype else total.to(t.dtype)
        host = self._buffer(t.shape, wire, pin=t.device.type == "cuda")
        host.copy_(t, non_blocking=True)  # device -> pinned host (dtype converted on the device side)
        if t.device.type == "cuda":
            torch.cuda.current_stream(t.device).synchronize()  # the wire reads the bytes next
        elif t.device.type == "mps":
            torch.mps.synchronize()
        total = self.inner.allreduce(host)  # [T, H] on the host: ours or the wire's tensor
        # host -> device: asynchronous from pinned memory; the next step's copy into `host` is
        # queued behind it on the same stream, so reusing the buffer is safe.
        return total.to(t.device, t.dtype, non_blocking=True)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        # Anything beyond the Collective interface (step tags, peers, ...) is the inner one's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class InProcessGroup:
    """The shared state of `world_size` ranks living as threads of one process."""

    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        self.world_size, self.timeout = world_size, timeout
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self._sum: torch.Tensor | None = None
        self._barrier = threading.Barrier(world_size, action=self._reduce, timeout=timeout)

    def _reduce(self) -> None:
        # Runs once per round in one thread while all ranks wait: sum in rank order, in fp32.
        acc = self._slots[0].to(torch.float32, copy=True)
        for s in self._slots[1:]:
            acc += s.to(torch.float32)
        self._sum = acc

    def member(self, rank: int) -> InProcessCollective:
        return InProcessCollective(self, rank)


class InProcessCollective(Collective):
    def __init__(self, group: InProcessGroup, rank: int) -> None:
        super().__init__()
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            raise ValueError(f"InProcessCollective sums host tensors; got one on {t.device} (wrap it in DeviceHop)")
        g = self.group
        g._slots[self.rank] = t
        # The last rank to arrive computes the sum. One barrier is enough: the next round's sum
        # is made only once every rank is back in wait(), i.e. after each one read this one.
        g._barrier.wait()
        return g._sum.to(t.dtype)

    def close(self) -> None:
        self.group._barrier.abort()
