#!/usr/bin/env python3
"""Quantised matmul kernels side by side on this CPU (the measurements behind docs/quant.md).

For each shape and step size (tokens T): fp32 (MKL, and oneDNN prepacked), bf16, torch's built-in
weight-only kernels (torch._weight_int8pack_mm per-row int8 and torch._weight_int4pack_mm_for_cpu
group-32 int4, which torchao's CPU int4 layout also calls; both take bf16 activations), and
tpi-node's own (model/qkernel.py: qmatmul.c on q4_1 / q8_0 blocks with fp32 activations, and
dequantise + GEMM, and --act-quant int8's integer kernel). Weights are cycled through copies of 256
MiB or more, as a real decode streams every layer once per token: nothing stays in the CPU caches
between two calls of one matrix. The copies sit in transparent huge pages (heap.huge_empty) as a
node's weights do, except oneDNN's prepacked ones (torch allocates those).

    .venv/bin/python scripts/bench_quant_kernels.py [--threads 2] [--tokens 1 8 64]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from tpi_node.heap import huge_empty
from tpi_node.model import qkernel
from tpi_node.model.quant import QMatrix, quantize

SHAPES = {"smollm2 gate|up": (3072, 576), "smollm2 lm_head": (49152, 576), "llama-7b up": (11008, 4096)}
CYCLE_BYTES = 256 << 20


def timed(fn, copies: list, budget_s: float = 0.3) -> float:
    """Median-free mean over a time budget, each call on the next copy (cold caches)."""
    it = itertools.cycle(copies)
    fn(next(it))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s or n < 5:
        fn(next(it))
        n += 1
    return (time.perf_counter() - t0) / n


def candidates(w: torch.Tensor) -> dict:
    """name -> (prepared weight, fn(x_fp32, weight) -> y)."""
    n, k = w.shape
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
    out = {
        "fp32 MKL": (w, lambda x, v: F.linear(x, v)),
        "fp32 oneDNN prepacked": (
            torch.ops.mkldnn._reorder_linear_weight(w),
            lambda x, v: torch.ops.mkldnn._linear_pointwise(x, v, None, "none", [], ""),
        ),
        "bf16": (w.bfloat16(), lambda x, v: F.linear(x.bfloat16(), v)),
        "torch int8pack (bf16 act)": (
            (torch.randint(-127, 127, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()),
            lambda x, v: torch._weight_int8pack_mm(x.bfloat16(), v[0], v[1]),
        ),
        "torch int4pack g32 (bf16 act)": (
            (torch._convert_weight_to_int4pack_for_cpu(q4, 1), torch.rand(k // 32, n, 2).bfloat16()),
            lambda x, v: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), v[0], 32, v[1]),
        ),
        "tpi dequant + GEMM q4_1": (quantize(w, "q4_1"), lambda x, v: F.linear(x, qkernel.dequantize(v))),
    }
    if qkernel.library() is not None:
        out["tpi kernel q8_0"] = (quantize(w, "q8_0"), lambda x, v: qkernel.kernel_matmul(x, v))
        out["tpi kernel q4_1"] = (quantize(w, "q4_1"), lambda x, v: qkernel.kernel_matmul(x, v))
        if qkernel.library().tpi_has_q8dot():
            out["tpi kernel q8_0, int8 act"] = (quantize(w, "q8_0"), lambda x, v: int8_act(x, v))
            out["tpi kernel q4_1, int8 act"] = (quantize(w, "q4_1"), lambda x, v: int8_act(x, v))
    return out


def int8_act(x: torch.Tensor, w: QMatrix) -> torch.Tensor:
    """The kernel as --act-quant int8 runs it."""
    qkernel.TUNING.int8_activations = True
    try:
        return qkernel.kernel_matmul(x, w)
    finally:
        qkernel.TUNING.int8_activations = False


def _copy(v):
    if isinstance(v, tuple):
        return tuple(_copy(t) for t in v)
    if isinstance(v, QMatrix):
        return QMatrix(_copy(v.data))
    if v.is_mkldnn:
        return v.clone()
    out = huge_empty(v.numel() * v.element_size()).view(v.dtype).view(v.shape)  # as a node holds weights
    return out.copy_(v)


def nbytes(v) -> int:
    if isinstance(v, tuple):
        return sum(nbytes(t) for t in v)
    if isinstance(v, QMatrix):
        return v.nbytes()
    if v.is_mkldnn:
        return v.numel() * 4
    return v.numel() * v.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    qkernel.TUNING.decode_threads = a.threads  # the kernel's own pool
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{cpu}, {a.threads} threads, {time.strftime('%Y-%m-%d')}; microseconds per call, weights cold\n")
    for shape in a.shapes:
        n, k = SHAPES[shape]
        w = torch.randn(n, k) * 0.02
        print(f"### {shape} [{n} x {k}]\n")
        print("| kernel | MiB | " + " | ".join(f"T={t}" for t in a.tokens) + " |")
        print("| --- | ---: | " + " | ".join("---:" for _ in a.tokens) + " |")
        for name, (v, fn) in candidates(w).items():
            size = nbytes(v)
            copies = [_copy(v) for _ in range(min(64, max(2, CYCLE_BYTES // max(size, 1))))]
            cells = []
            for t in a.tokens:
                x = torch.randn(t, k)
                cells.append(f"{timed(lambda c: fn(x, c), copies) * 1e6:.0f}")
            print(f"| {name} | {size / 2**20:.1f} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
