"""Where a node computes: pick the device (CUDA, then Apple MPS, then CPU), say what it is, choose
its dtype and measure its speed for the partition plan (layer files reach the device through
weights/upload.py).

    info = select_device("auto")          # DeviceInfo(name, kind, memory_bytes, capability, device)
    dtype = default_dtype(info)           # bf16 on CUDA (sm_80+) and MPS, fp16 on older CUDA, fp32 on CPU
    cap = device_capacity("w1", info)     # NodeCapacity with memory of that device and measured speed

Nothing here imports CUDA-only code: `torch.cuda.is_available()` and `torch.backends.mps` are
plain queries on a CPU build of torch, and streams / pinned memory are touched only once a CUDA
device was chosen.

Memory counted per device: a CUDA card's own memory (weights, KV cache, activations live there;
host RAM then holds only the runtime and one pinned staging buffer of one layer file). On
integrated GPUs (Jetson) and Apple silicon (MPS) the device memory IS the host RAM: one pool,
`shared_memory=True`, and the budget counts weights once.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from dataclasses import dataclass

import psutil
import torch

from tpi_node.dtypes import DTYPE_NAMES, torch_dtype
from tpi_node.errors import UserError
from tpi_node.weights.plan import NodeCapacity

SDPA_ENV = "TPI_CUDA_SDPA"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # "NVIDIA H100 80GB HBM3", "Apple MPS", "cpu (x86_64, 16 cores)"
    kind: str  # cuda | mps | cpu
    memory_bytes: int  # total memory of the device (host RAM for cpu / mps / integrated)
    capability: str | None  # CUDA compute capability "sm_90"; None elsewhere
    device: torch.device
    shared_memory: bool = True  # device memory is the host RAM (cpu, mps, Jetson)

    def summary(self) -> str:
        """One line, as printed at join and shown by `tpi-node status`."""
        cap = f" {self.capability}" if self.capability else ""
        pool = ", shared with host RAM" if self.shared_memory and self.kind != "cpu" else ""
        return f"{self.device} ({self.name}{cap}, {self.memory_bytes / 2**30:.1f} GiB{pool})"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "memory_bytes": self.memory_bytes,
            "capability": self.capability,
            "device": str(self.device),
            "shared_memory": self.shared_memory,
            "summary": self.summary(),
        }


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def _cpu_info() -> DeviceInfo:
    cores = cpu_cores()
    return DeviceInfo(
        f"cpu ({platform.machine() or 'unknown'}, {cores} cores)",
        "cpu",
        psutil.virtual_memory().total,
        None,
        torch.device("cpu"),
        True,
    )


def _cuda_info(index: int) -> DeviceInfo:
    set_cuda_attention()  # a CUDA node computes here: pick its attention kernels
    p = torch.cuda.get_device_properties(index)
    integrated = bool(getattr(p, "is_integrated", False))  # Jetson: one memory for CPU and GPU
    return DeviceInfo(
        p.name, "cuda", int(p.total_memory), f"sm_{p.major}{p.minor}", torch.device("cuda", index), integrated
    )


def _mps_info() -> DeviceInfo:
    total = psutil.virtual_memory().total
    try:  # what Metal lets this process use (a share of the unified memory)
        total = int(torch.mps.recommended_max_memory()) or total
    except (AttributeError, RuntimeError):
        pass
    return DeviceInfo("Apple MPS", "mps", total, None, torch.device("mps"), True)


def select_device(spec: str | None = "auto") -> DeviceInfo:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> DeviceInfo; UserError when not available here."""
    text = (spec or "auto").strip().lower()
    m = _SPEC.match(text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise UserError(f"unknown device '{spec}': use auto, cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), int(m.group(2) or 0)
    if kind == "auto":
        if torch.cuda.is_available():
            return _cuda_info(torch.cuda.current_device())
        return _mps_info() if _mps_available() else _cpu_info()
    if kind == "cpu":
        return _cpu_info()
    if kind == "mps":
        if not _mps_available():
            raise UserError(
                "device 'mps' is not available here (needs Apple silicon, macOS 12.3+ and a "
                "torch build with MPS); use --device auto or cpu"
            )
        return _mps_info()
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU or driver found"
        raise UserError(f"device '{text}' is not available here ({why}); use --device auto or cpu")
    n = torch.cuda.device_count()
    if index >= n:
        raise UserError(f"device '{text}' does not exist: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return _cuda_info(index)


# ---- attention kernels on CUDA ------------------------------------------------------------------
# Decode attends over a KV length that grows by one every step, so every step is a new shape.
# PyTorch's cuDNN attention (the first choice for bf16/fp16 on sm_80+ in torch 2.5+) builds and
# caches an execution plan per shape; on the H100 that made bf16 decode 3-14x slower than fp32
# (docs/device-results.md). The other kernels (memory-efficient, flash, math) need no plan.
SDPA_SETTINGS = {
    "no-cudnn": dict(cudnn=False, flash=True, mem_efficient=True, math=True),  # our default
    "default": dict(cudnn=True, flash=True, mem_efficient=True, math=True),  # torch's own choice
    "mem-efficient": dict(cudnn=False, flash=False, mem_efficient=True, math=True),
    "flash": dict(cudnn=False, flash=True, mem_efficient=False, math=True),
    "math": dict(cudnn=False, flash=False, mem_efficient=False, math=True),
}


def set_cuda_attention(setting: str | None = None) -> str:
    """Which scaled_dot_product_attention kernels CUDA may use (process-wide flags; a CPU node in
    the same process is not affected). setting: a SDPA_SETTINGS key, else $TPI_CUDA_SDPA, else
    'no-cudnn'. Math stays allowed in every setting, as the fallback for shapes the others refuse."""
    name = setting or os.environ.get(SDPA_ENV) or "no-cudnn"
    if name not in SDPA_SETTINGS:
        raise UserError(f"unknown {SDPA_ENV} '{name}': use {', '.join(SDPA_SETTINGS)}")
    flags = SDPA_SETTINGS[name]
    b = torch.backends.cuda
    if hasattr(b, "enable_cudnn_sdp"):  # torch >= 2.2
        b.enable_cudnn_sdp(flags["cudnn"])
    b.enable_flash_sdp(flags["flash"])
    b.enable_mem_efficient_sdp(flags["mem_efficient"])
    b.enable_math_sdp(flags["math"])
    return name


def default_dtype(info: DeviceInfo, asked: str | None = None) -> str:
    """The compute dtype name for this device: `asked` when it suits the device, else the default
    (bf16 on CUDA sm_80+ and MPS; fp16 on older CUDA cards, which have no bf16 arithmetic; fp32 on CPU)."""
    if asked is not None:
        if asked not in DTYPE_NAMES:
            raise UserError(f"unknown dtype '{asked}': use {', '.join(DTYPE_NAMES)}")
        if asked == "fp16" and info.kind == "cpu":
            raise UserError("dtype fp16 is not supported on cpu (too slow there); use fp32 or bf16")
        if asked == "bf16" and info.kind == "cuda" and _sm(info) < (8, 0):
            raise UserError(f"{info.name} ({info.capability}) has no bf16 arithmetic; use fp16 or fp32")
        return asked
    if info.kind == "cuda":
        return "bf16" if _sm(info) >= (8, 0) else "fp16"
    return "bf16" if info.kind == "mps" else "fp32"


def _sm(info: DeviceInfo) -> tuple[int, int]:
    digits = (info.capability or "sm_00")[3:]
    return int(digits[:-1] or 0), int(digits[-1])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# A decode-shaped product: a few tokens [T, K] times one weight block [K, N], as one layer's matmuls
# of a small model. It measures what decoding is bound by on each device (memory bandwidth plus
# launch overhead), not a card's peak FLOP/s.
BENCH_SHAPE = (16, 1024, 4096)  # T, K, N


@functools.cache
def measure_speed(device: str | torch.device = "cpu", dtype: str = "fp32", seconds: float = 0.1) -> float:
    """GFLOP/s of BENCH_SHAPE products on `device` in `dtype`, over about `seconds`: the best of
    several timed rounds, so a neighbour's burst on a shared machine does not decide the plan.

    A CPU is measured on one thread, times the threads torch computes with: all threads at once
    wait for the slowest at every product, so any other busy process scatters the result
    (measured on a shared 2-core VM: 3.5 to 112 GFLOP/s on 2 threads; 108 to 127 on one, x2)."""
    if torch.device(device).type == "cpu" and torch.get_num_threads() > 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return threads * measure_speed.__wrapped__(device, dtype, seconds)
        finally:
            torch.set_num_threads(threads)
    dev = torch.device(device)
    T, K, N = BENCH_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=gen).to(dev, torch_dtype(dtype))
    w = torch.randn(N, K, generator=gen).to(dev, torch_dtype(dtype))
    per_round = 2 if dev.type == "cpu" else 32
    with torch.inference_mode():
        torch.nn.functional.linear(x, w)  # warm-up: kernels chosen, caches filled
        synchronize(dev)
        best, start = float("inf"), time.perf_counter()
        while best == float("inf") or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            for _ in range(per_round):
                torch.nn.functional.linear(x, w)
            synchronize(dev)
            best = min(best, (time.perf_counter() - t0) / per_round)
    return 2 * T * K * N / best / 1e9


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_memory_free(info: DeviceInfo) -> int:
    """Bytes this node may still take on its device now (CUDA: free card memory; else free RAM)."""
    if info.kind == "cuda" and not info.shared_memory:
        free, _total = torch.cuda.mem_get_info(info.device)
        return int(free)
    return int(psutil.virtual_memory().available)


def device_capacity(
    node_id: str,
    info: DeviceInfo,
    memory_budget: int | None = None,
    dtype: str | None = None,
    speed: float | None = None,
) -> NodeCapacity:
    """This node's NodeCapacity: memory of the device it computes on (the budget when given,
    never more than what is free there) and its measured speed, so faster devices get more work."""
    free = device_memory_free(info)
    mem = min(memory_budget, free) if memory_budget else free
    if speed is None:
        speed = measure_speed(str(info.device), default_dtype(info, dtype))
    return NodeCapacity(
        node_id=node_id,
        memory_bytes=mem,
        cores=cpu_cores(),
        budgeted=memory_budget is not None,
        disk_bytes=psutil.disk_usage(os.path.expanduser("~")).free,
        speed=speed,
    )
