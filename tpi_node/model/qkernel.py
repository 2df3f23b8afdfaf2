"""The quantised matmul every node runs: y = x @ W.T with W a QMatrix (model/quant.py).

Two ways, chosen per step size by a short measurement where the node starts (`tune`):
- `kernel`: qmatmul.c, compiled on first use with the machine's C compiler for its own CPU
  (-march=native: AVX-512, AVX2 or NEON code as the CPU has) and cached under
  $TPI_HOME/kernels; it reads the blocks straight from memory (4.5-8.5 bits a weight), so it wins
  where decode is bound by memory bandwidth: small steps.
- `dequant`: the blocks are expanded to a float matrix once per call, then one oneDNN/MKL GEMM;
  wins for big steps (prefill chunks), and is the only way on a GPU or without a C compiler.
Both are exact: the products use the dequantised weights in fp32 (see qmatmul.c).

    python -m tpi_node.model.qkernel      # build (make install does this) and print the tuning
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tpi_node.model.quant import KIND, QMatrix, quantize
from tpi_node.paths import kernels_dir

# one library: the quantised matmul, and the small fp32 ops of a decode step (model/decode_ops.py)
SOURCES = (Path(__file__).with_name("qmatmul.c"), Path(__file__).with_name("decode_ops.c"))
CFLAGS = ("-O3", "-pthread", "-shared", "-fPIC")
# what the kernels are compiled for: gcc's -march, this CPU unless set (TPI_KERNEL_ARCH=x86-64-v3 builds
# the AVX2 path, x86-64 the plain C one: one build for a family of CPUs, and how the tests run those
# paths on an AVX-512 machine)
ARCH_ENV = "TPI_KERNEL_ARCH"
STEP_SIZES = (1, 2, 4, 8, 16, 32, 64)  # tokens per step tried by `tune`
# tpi_decode_layers' callback: a half layer's partial (float *, values) -> 0, or nonzero to stop
REDUCE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64)

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cflags() -> tuple[str, ...]:
    return (*CFLAGS, f"-march={os.environ.get(ARCH_ENV) or 'native'}")


def library_path() -> Path:
    code = b"".join(src.read_bytes() for src in SOURCES)
    key = hashlib.sha256(code + " ".join(_cflags()).encode() + _cpu_key().encode()).hexdigest()
    return kernels_dir() / f"qmatmul-{key[:16]}.so"


def build() -> Path:
    """Compile qmatmul.c and decode_ops.c for this CPU (once; concurrent nodes wait for the first). Raises
    RuntimeError with the compiler's message when there is no compiler or it fails."""
    out = library_path()
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        argv = [cc, *_cflags(), "-o", str(tmp), *map(str, SOURCES), "-lm"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cc} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, out)
    return out


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (the reason is in `library_error()`)."""
    global _lib, _lib_error
    if _lib is not None:  # every matmul and decode op asks: no lock once it is loaded
        return _lib
    with _lib_lock:
        if _lib is None and _lib_error is None:
            try:
                lib = ctypes.CDLL(str(build()))
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                lib.tpi_qmatmul.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
                lib.tpi_qmatmul_q8.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
                lib.tpi_has_q8dot.argtypes = []
                f32, c32, c64 = ctypes.c_float, ctypes.c_int, ctypes.c_int64
                lib.tpi_add_rmsnorm.argtypes = [ptr, ptr, ptr, c64, c64, f32, ptr, ptr]
                lib.tpi_rope_store.argtypes = [ptr, c64, c64, c64, c64, ptr, ptr, ptr, ptr, ptr]
                lib.tpi_attend_decode.argtypes = [ptr, c64, ptr, c64, c64, c64, c64, ptr, ptr, ptr, c64, ptr]
                lib.tpi_attend_decode.argtypes += [f32, c32, ptr, c64]
                for fn in (lib.tpi_add_rmsnorm, lib.tpi_rope_store):
                    fn.restype = None
                lib.tpi_attention_decode.argtypes = [ptr, c64, c64, c32, ptr, ptr, c32, ptr, c64, c64, c64, ptr]
                lib.tpi_attention_decode.argtypes += [ptr, ptr, ptr, ptr, ptr, c64, ptr, f32, c32, c32, ptr]
                lib.tpi_mlp.argtypes = [ptr, c64, c64, c32, ptr, c32, ptr, c64, c32, c32, ptr]
                lib.tpi_decode_layers.argtypes = [c64, *[ptr] * 13, c64, c64, c64, c64, c64, c64, ptr, ptr, ptr]
                lib.tpi_decode_layers.argtypes += [ptr, c64, ptr, f32, f32, c32, c32, ptr, ptr, REDUCE_FN]
                lib.tpi_dequant.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int]
                _lib = lib
            except (OSError, RuntimeError) as e:
                _lib_error = str(e)
        return _lib


def library_error() -> str | None:
    library()
    return _lib_error


@dataclass
class Tuning:
    """How this node runs a quantised matmul (set once by `tune`, read by every call). The kernel
    (small steps) runs on decode_threads of its own pool; dequantise + GEMM (big steps) on torch's
    threads. `tune` tries at most torch's count at start: a local cluster gives each node its share."""

    kernel_max_tokens: int = 16  # steps of up to this many tokens use the kernel, bigger ones dequant
    decode_threads: int = 1  # threads for small steps: 1 unless more measured clearly faster
    measured: str = ""  # what `tune` saw, for the start-up log line
    int8_activations: bool = False  # --act-quant int8 where the kernel has it (use_act_quant)
    act_note: str = ""  # why --act-quant int8 runs exact here, when it does

    def describe(self) -> str:
        lib = library()
        if lib is None:
            return f"quantised matmul: dequantise + GEMM for every step (no kernel: {_lib_error})"
        act = "int8 activations (VNNI)" if self.int8_activations else f"fp32-exact{self.act_note}"
        return (
            f"quantised matmul: C kernel, {act}, for steps <= {self.kernel_max_tokens} tokens (decode on "
            f"{self.decode_threads} thread{'s' if self.decode_threads > 1 else ''}), dequantise + GEMM above "
            f"({self.measured})"
        )


TUNING = Tuning()


def use_act_quant(mode: str) -> None:
    """--act-quant: 'int8' runs the kernel's small steps with int8 activations (qmatmul.c,
    tpi_qmatmul_q8) where this build has them (AVX512-VNNI), else the exact kernel, and `describe`
    says why; 'none' keeps fp32-exact products. Set before `tune`, which then times what runs."""
    lib = library()
    has = lib is not None and bool(lib.tpi_has_q8dot())
    TUNING.int8_activations = mode == "int8" and has
    TUNING.act_note = ""
    if mode == "int8" and not has:
        TUNING.act_note = " (--act-quant int8 needs AVX512-VNNI, which this CPU or build lacks)"


def _threads() -> int:
    return torch.get_num_threads()


def _kernel_threads() -> int:
    """The kernel runs small steps (decode) on its own pool: as many threads as `tune` found
    faster, however many torch uses for its own small ops meanwhile (one, see engine/runner.py)."""
    return TUNING.decode_threads


def kernel_matmul(x: torch.Tensor, w: QMatrix, threads: int | None = None) -> torch.Tensor:
    """x [T, K] -> [T, N] float32 through qmatmul.c (CPU, contiguous blocks)."""
    lib = library()
    xf = x.float().contiguous()
    n, k = w.shape
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    data = w.data if w.data.is_contiguous() else w.data.contiguous()
    fn = lib.tpi_qmatmul_q8 if TUNING.int8_activations else lib.tpi_qmatmul
    rc = fn(KIND[w.fmt], xf.data_ptr(), xf.shape[0], k, data.data_ptr(), n, y.data_ptr(), threads or _kernel_threads())
    if rc != 0:  # -1: a bad argument; -2 cannot happen (use_act_quant checked tpi_has_q8dot)
        raise ValueError(f"qmatmul refused x {list(x.shape)} against a {w.fmt} {list(w.shape)} matrix")
    return y


def dequantize(w: QMatrix, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows [start, end) of w as a float matrix (the C kernel when loaded, else torch ops)."""
    end = w.shape[0] if end is None else end
    lib = library() if w.device.type == "cpu" else None
    if lib is None:
        return w.rows(start, end).dequantize(dtype)
    data = w.data if w.data.is_contiguous() else w.data.contiguous()
    out = torch.empty(end - start, w.shape[1], dtype=torch.float32)
    lib.tpi_dequant(KIND[w.fmt], data.data_ptr(), w.shape[1], start, end, out.data_ptr(), _threads())
    return out if dtype == torch.float32 else out.to(dtype)


def qlinear(x: torch.Tensor, w: QMatrix, bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """x [T, K] (any float dtype) @ w.T + bias -> [T, N] in x's dtype; small steps through the
    kernel on `threads` (default: decode_threads)."""
    if x.device.type == "cpu" and x.shape[0] <= TUNING.kernel_max_tokens and library() is not None:
        y = kernel_matmul(x, w, threads).to(x.dtype)
        return y + bias if bias is not None else y
    return dequant_linear(x, w, bias)


DEQUANT_CHUNK = 4 << 20  # weights dequantised at a time (16 MiB of fp32): the transient stays small


def dequant_linear(x: torch.Tensor, w: QMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T through dequantise + GEMM, a block of rows at a time: never a float copy of a whole
    big matrix (a 70B layer's gate|up slice would be 224 MiB of fp32 for a moment)."""
    n, k = w.shape
    rows = max(1, DEQUANT_CHUNK // k)
    if rows >= n:
        return F.linear(x, dequantize(w, x.dtype).to(x.device), bias)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        y[:, a:b] = F.linear(x, dequantize(w, x.dtype, a, b).to(x.device), None if bias is None else bias[a:b])
    return y


def best_of(fns: dict, rounds: int = 5, budget_s: float = 0.004) -> dict:
    """Seconds per call of each fn: the best of `rounds` short runs, taken in turns, so that load
    from other processes hits every candidate alike and the minimum filters it out."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - t0 < budget_s:
                fn()
                n += 1
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


# Decode runs on all threads only where they win clearly (a thread team waits on its slowest
# member): by THREAD_WIN, in the best of up to THREAD_TRIES measurements. On the 2-core AMD EPYC VM
# a single measurement (one try at a 1.25 margin) chose 1 thread in about 1 start of 4: the second
# core was busy for the measurement's ~40 ms (SmolLM2's gate|up, 1/2 threads: 130 against 98-130
# us, 69 usual), and decode then ran at 88 tok/s against 140. Four tries at 1.25 still chose 1
# thread in 2 starts of 6 (119 and 130 us throughout); four at 1.1 chose 2 threads in 8 of 8.
THREAD_TRIES = 4
THREAD_WIN = 1.1

# Kernel against dequantise + GEMM, per step size, on all of a layer's matrices in turn: one
# matrix dequantised again and again reuses one hot fp32 buffer, which a forward never does. Timed
# on gate|up alone, dequantise + GEMM won from 64 tokens on the 2-core AMD EPYC VM and tune chose
# 32; in the engine the kernel's prefill was faster up to ~100 tokens (40-token prompt: 103 ms
# against 146; 120 tokens: 297 against 260). Timed on the whole layer, it wins to 64 tokens
# (1.7x; 1.16x at 128: this timing still flatters the kernel a little, hence no larger step).
# Every step size is measured and the crossover is the one that contradicts the fewest of them:
# stopping at the first step the kernel lost let one busy moment decide.
STEP_ROUNDS = 3


def crossover(wins: list[bool]) -> int:
    """How many of the smallest step sizes go to the kernel: the count c for which "the kernel wins
    the first c sizes and loses the rest" contradicts the fewest measurements (ties: the larger c).
    Both times grow with the step, the kernel's faster, so the truth has a single crossing."""

    def contradictions(c: int) -> int:
        return sum(not w for w in wins[:c]) + sum(wins[c:])

    return min(range(len(wins) + 1), key=lambda c: (contradictions(c), -c))


def tune(samples: list[QMatrix] | None = None, max_threads: int | None = None) -> Tuning:
    """Measure on this machine, on `samples` (one layer's quantised matrices of this node, else a
    2048 x 2048 q4_1 matrix), in ~0.5 s: one-token steps of the largest on 1 thread against
    `max_threads` (torch's count; measured again, up to THREAD_TRIES times, while all threads do not
    win clearly), and the kernel against dequantise + GEMM over them all for each step size in
    STEP_SIZES. Sets and returns TUNING."""
    if library() is None:
        TUNING.kernel_max_tokens, TUNING.measured = 0, ""
        return TUNING
    samples = [m for m in samples or () if m.device.type == "cpu"] or [quantize(torch.randn(2048, 2048), "q4_1")]
    # bounded time and memory: at most DEQUANT_CHUNK weights of each
    samples = [m.rows(0, min(m.shape[0], max(256, DEQUANT_CHUNK // m.shape[1]))) for m in samples]
    big = max(samples, key=QMatrix.nbytes)
    most = max_threads or torch.get_num_threads()
    key = (tuple((m.fmt, m.shape) for m in samples), most, TUNING.int8_activations)
    if key in _TUNED:  # the same matrices' shapes on this machine, measured earlier (a re-plan)
        TUNING.kernel_max_tokens, TUNING.decode_threads, TUNING.measured = _TUNED[key]
        return TUNING
    x1 = torch.randn(1, big.shape[1])
    if most > 1:
        t, tries = {1: float("inf"), most: float("inf")}, 0
        while tries < THREAD_TRIES and not t[most] * THREAD_WIN < t[1]:
            if tries:
                time.sleep(0.05)  # a busy moment of the other cores passes
            got = best_of({1: lambda: kernel_matmul(x1, big, 1), most: lambda: kernel_matmul(x1, big, most)})
            t, tries = {n: min(t[n], got[n]) for n in t}, tries + 1
        TUNING.decode_threads = most if t[most] * THREAD_WIN < t[1] else 1
        us = f"{t[1] * 1e6:.0f}/{t[most] * 1e6:.0f} us"
        notes = [f"1 token on 1/{most} threads: {us} ({tries} {'tries' if tries > 1 else 'try'})"]
    else:
        TUNING.decode_threads, notes = 1, []
    wins, steps = [], []
    for n in STEP_SIZES:
        xs = [torch.randn(n, m.shape[1]) for m in samples]
        t = best_of(
            {
                "kernel": lambda: [kernel_matmul(x, m, most) for x, m in zip(xs, samples)],
                "dequant": lambda: [dequant_linear(x, m) for x, m in zip(xs, samples)],
            },
            rounds=STEP_ROUNDS,
        )
        steps.append(f"{n}: {t['kernel'] * 1e6:.0f}/{t['dequant'] * 1e6:.0f}")
        wins.append(t["kernel"] <= t["dequant"])
    kernel_steps = crossover(wins)
    TUNING.kernel_max_tokens = STEP_SIZES[kernel_steps - 1] if kernel_steps else 0
    notes.append("tokens: kernel/dequant us " + ", ".join(steps))
    shapes = ", ".join(f"{m.shape[0]}x{m.shape[1]}" for m in samples)
    TUNING.measured = f"{big.fmt} {shapes}; " + "; ".join(notes)
    _TUNED[key] = (
        TUNING.kernel_max_tokens,
        TUNING.decode_threads,
        TUNING.measured + " (measured once in this process)",
    )
    return TUNING


# what `tune` measured in this process, by the shapes it measured on: a re-plan (or a test's next
# engine) with the same slices takes it instead of ~0.35 s of timing runs
_TUNED: dict[tuple, tuple[int, int, str]] = {}


if __name__ == "__main__":
    try:
        print(f"built {build()}")
    except RuntimeError as e:
        print(f"not built ({e}); quantised layers will dequantise per step", file=sys.stderr)
    print(tune().describe())
