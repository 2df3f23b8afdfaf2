#!/usr/bin/env python3
"""Quantised weights, side by side in one run on one machine with the same threads: TTFT, decode
tokens/s and peak RSS of tpi-node serving SmolLM2-135M-Instruct in fp32, --quant int8, --quant
int4 and natively from its Q4_1 GGUF (exact, and with --act-quant int8), and of llama.cpp
(llama-cpp-python) on the same GGUF.

Each configuration runs in a process of its own (peak RSS is per process); greedy decoding,
speculation off, the same chat prompt. The fp32 checkpoint is the GGUF dequantised by tpi-node's
own reader (bit for bit what transformers computes), written once under $TPI_HOME/bench.

    .venv/bin/python scripts/bench_quant.py [--threads 2] [--tokens 128] [--repeats 3]
    .venv/bin/python scripts/bench_quant.py --llama-cpp     # also llama.cpp: installs
        llama-cpp-python into .bench/llama-cpp-venv on first use (builds from source: ~10 min on 2 cores)
    .venv/bin/python scripts/bench_quant.py --llama-cpp --model FILE.gguf   # another GGUF: served
        natively (exact, and with --act-quant int8) against llama.cpp on the same file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_VENV = ROOT / ".bench" / "llama-cpp-venv"
PROMPT = "Write a long story about a robot who learns to paint, with many details."
# gguf-q4_1+act-int8: the same file served with --act-quant int8 (int8 activations, not fp32-exact)
CONFIGS = ("fp32", "int8", "int4", "gguf-q4_1", "gguf-q4_1+act-int8")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def resident_by_kind() -> dict[str, int]:
    """This process's resident bytes by kind of mapping (/proc/self/smaps). llama.cpp's process
    imports it from this file too (LLAMA_SNIPPET: the file needs nothing but the standard library
    at import)."""
    kinds: dict[str, int] = {}
    kind = "other"
    for ln in open("/proc/self/smaps"):
        f = ln.split()
        if len(f) >= 5 and "-" in f[0] and not f[0].endswith(":"):  # a mapping's header line
            name = f[5] if len(f) > 5 else ""
            if name == "[heap]":
                kind = "heap (malloc)"
            elif not name:
                kind = "anonymous (mmap)"
            elif name.endswith(".gguf"):
                kind = "the model file (mmap)"
            else:
                kind = "shared libraries (code, data)" if name.startswith("/") else "other"
        elif f[0] == "Rss:":
            kinds[kind] = kinds.get(kind, 0) + int(f[1]) * 1024
    return kinds


def growth(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def float_dir(gguf_dir: Path) -> Path:
    """The GGUF dequantised to an fp32 Hugging Face directory (written once)."""
    import torch
    from safetensors.torch import save_file

    from tpi_node.model.quant import QMatrix
    from tpi_node.paths import tpi_home
    from tpi_node.weights.checkpoint import open_checkpoint

    out = tpi_home() / "bench" / f"{gguf_dir.name}-fp32"
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reader = open_checkpoint(gguf_dir)
    state = {}
    for name in reader.names():
        w = reader.get(name)
        state[name] = (w.dequantize() if isinstance(w, QMatrix) else w.to(torch.float32)).contiguous()
    save_file(state, str(tmp / "model.safetensors"))
    for f in gguf_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja") and not f.is_symlink():
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def model_dir(model: str | None) -> Path:
    """The prepared directory of --model (a GGUF file), else of the default model."""
    from tpi_node.weights.prepare import prepare_model, resolve_model

    return resolve_model(model, progress=False) if model else prepare_model(progress=False)


def run_tpi(config: str, threads: int, tokens: int, model: str | None) -> dict:
    """In this process: one configuration, measured."""
    import torch

    torch.set_num_threads(threads)
    from tpi_node.commands.compose import build_local_engine
    from tpi_node.model.sampling_params import SamplingParams

    idle, idle_kinds = rss(), resident_by_kind()
    gguf_dir = model_dir(model)
    gguf = config.startswith("gguf")
    model, quant = (gguf_dir, "none") if gguf else (float_dir(gguf_dir), config.replace("fp32", "none"))
    act = "int8" if config.endswith("+act-int8") else "none"
    engine = build_local_engine(model, progress=False, quant=quant, speculative="off", act_quant=act)
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
    list(engine.generate_sync(ids, SamplingParams(max_tokens=4, temperature=0)))  # warm up
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.generate_sync(ids, params)]
    engine.shutdown()
    return {
        "ttft_s": stamps[0] - t0,
        "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "peak_rss": peak_rss(),
        "idle_rss": idle,
        "prompt_tokens": len(ids),
        "growth": growth(idle_kinds, resident_by_kind()),
    }


LLAMA_SNIPPET = r"""
import json, sys, time
from llama_cpp import Llama
def status(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key))
sys.path.insert(0, sys.argv[7])
from bench_quant import resident_by_kind
idle, idle_kinds = status("VmRSS:"), resident_by_kind()
path, prompt = sys.argv[1], sys.argv[2]
threads, tokens, batch, n_ctx = (int(v) for v in sys.argv[3:7])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=batch, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
llm(prompt, max_tokens=4, temperature=0.0)  # warm up
llm.reset()
t0 = time.perf_counter(); stamps = []
for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
    stamps.append(time.perf_counter())
    if len(stamps) == tokens:
        break
print(json.dumps({"ttft_s": stamps[0] - t0, "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
                  "peak_rss": status("VmHWM:"), "idle_rss": idle, "prompt_tokens": len(ids), "n_batch": batch,
                  "n_ctx": n_ctx, "growth": {k: v - idle_kinds.get(k, 0) for k, v in resident_by_kind().items()}}))
"""


def ensure_llama_cpp() -> Path:
    py = LLAMA_VENV / "bin" / "python"
    if py.is_file() and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    print(f"installing llama-cpp-python into {LLAMA_VENV} (builds from source, ~10 min on 2 cores) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "llama-cpp-python"], check=True)
    return py


def run_llama_cpp(threads: int, tokens: int, model: str | None) -> dict:
    from tpi_node.model.tokenizer import Tokenizer

    gguf_dir = model_dir(model)
    tok = Tokenizer.from_dir(gguf_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    # its KV cache is allocated (and cleared) whole at n_ctx: just what the run needs, in steps of
    # 256, as tpi-node's paged cache takes pages only for the tokens it holds
    n_ctx = -(-(len(tok.encode(prompt, add_special_tokens=False)) + tokens + 8) // 256) * 256
    py = ensure_llama_cpp()
    # n_batch 512 (its default) prefills in batches; the llama-cpp-python 0.3.36 build here crashed
    # (SIGSEGV) in its batched CPU path on this AMX Xeon, so a crash retries with one token per batch
    # (decode is one token per step either way; TTFT then counts a token-by-token prefill).
    for batch in (512, 1):
        argv = [py, "-c", LLAMA_SNIPPET, str((gguf_dir / "model.gguf").resolve()), prompt, str(threads), str(tokens)]
        # tpi_node sets OMP_WAIT_POLICY=PASSIVE for its own processes (tpi_node/__init__.py); llama.cpp
        # runs with its own defaults (passive waiting made it ~7x slower here)
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        out = subprocess.run(
            [*argv, str(batch), str(n_ctx), str(Path(__file__).parent)], capture_output=True, text=True, env=env
        )
        if out.returncode == 0:
            return json.loads(out.stdout.strip().splitlines()[-1])
    raise RuntimeError(f"llama.cpp failed (exit {out.returncode}): {out.stderr[-1500:]}")


def child(config: str, threads: int, tokens: int, model: str | None) -> dict:
    cmd = [sys.executable, __file__, "--one", config, "--threads", str(threads), "--tokens", str(tokens)]
    cmd += ["--model", model] if model else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{config} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each config once per round, medians shown")
    ap.add_argument("--llama-cpp", action="store_true", help="also measure llama.cpp (installs it on first use)")
    ap.add_argument("--model", help="a GGUF file to serve instead of the default model (native configs only)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one = run_llama_cpp if a.one == "llama.cpp" else lambda *args: run_tpi(a.one, *args)
        print(json.dumps(one(a.threads, a.tokens, a.model)))
        return
    gguf = (model_dir(a.model) / "model.gguf").resolve()
    if a.model:  # another file: no float checkpoint of it to compare with
        native, configs = "gguf", ["gguf", "gguf+act-int8"]
    else:
        float_dir(model_dir(None))  # once, outside the timed runs
        native, configs = "gguf-q4_1", list(CONFIGS)
    configs += ["llama.cpp"] if a.llama_cpp else []
    if a.llama_cpp:
        ensure_llama_cpp()
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(a.repeats):  # interleaved rounds: drifting machine load hits every config alike
        for c in configs:
            runs[c].append(child(c, a.threads, a.tokens, a.model))
            print(f"round {r + 1}/{a.repeats} {c}: {runs[c][-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    name = a.model or "SmolLM2-135M-Instruct"
    print(f"\n{name}, {a.tokens} greedy tokens, {a.threads} threads, median of {a.repeats} rounds")
    print(f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, {time.strftime('%Y-%m-%d')}")
    print(f"GGUF: {gguf.name} {gguf.stat().st_size / 2**20:.0f} MiB\n")
    base = statistics.median(x["tok_s"] for x in runs[native])
    lcpp = statistics.median(x["tok_s"] for x in runs["llama.cpp"]) if a.llama_cpp else None
    size = gguf.stat().st_size
    print(
        "| config | TTFT ms | decode tok/s | vs llama.cpp | peak RSS MiB | idle runtime MiB "
        "| peak - idle MiB | (peak - idle) / GGUF |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in configs:
        med = {k: statistics.median(x[k] for x in runs[c]) for k in ("ttft_s", "tok_s", "peak_rss", "idle_rss")}
        rel = f"{med['tok_s'] / lcpp:.2f}x" if lcpp else "-"
        print(
            f"| {c} | {med['ttft_s'] * 1e3:.0f} | {med['tok_s']:.1f} | {rel} | "
            f"{med['peak_rss'] / 2**20:.0f} | {med['idle_rss'] / 2**20:.0f} | "
            f"{(med['peak_rss'] - med['idle_rss']) / 2**20:.0f} | {(med['peak_rss'] - med['idle_rss']) / size:.2f}x |"
        )
    if lcpp and any(x.get("n_batch") == 1 for x in runs["llama.cpp"]):
        print(
            "\nllama.cpp ran with n_batch=1: its batched prefill crashed here, so its TTFT is a token-by-token prefill"
        )
    print(f"\nRSS goal: peak - idle <= 1.3x the GGUF ({1.3 * size / 2**20:.0f} MiB)")
    shown = [c for c in (native, "llama.cpp") if c in runs]
    kinds = sorted({k for c in shown for k, v in runs[c][-1]["growth"].items() if abs(v) >= 2**16})
    print("\nResident memory grown since idle, by kind of mapping, MiB (the last round):\n")
    print("| kind | " + " | ".join(shown) + " |")
    print("| --- |" + " ---: |" * len(shown))
    for k in kinds:
        print(f"| {k} | " + " | ".join(f"{runs[c][-1]['growth'].get(k, 0) / 2**20:.1f}" for c in shown) + " |")
    if "fp32" in runs:
        print(f"\nnative Q4_1 decode vs fp32: {base / statistics.median(x['tok_s'] for x in runs['fp32']):.2f}x")


if __name__ == "__main__":
    main()
