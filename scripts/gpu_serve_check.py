"""Serving check of the GPU fast path (issue 17): the default model through the real OpenAI API,
`--fast-path auto` vs `--fast-path off`, on one GPU. One process per mode:

  1. the master exactly as `tpi-node serve` builds it (settings loaded like the CLI's, then
     commands.compose.start_master and commands.serve.serve_http, uvicorn in a thread of this
     process), one node on --device; its start-up line (what the fast path runs) is recorded;
  2. greedy text: /v1/chat/completions, temperature 0, 48 tokens;
  3. TTFT of a 4096-token prompt: streamed /v1/completions of random token ids (a new prompt each
     time: no prefix-cache hit), max_tokens 1, time to the first chunk; median of 3 after a warm-up;
  4. decode tokens/s: streamed /v1/completions, 256 tokens, ignore_eos, speculation off:
     (completion_tokens - 1) / (last chunk - first chunk); median of 3;
  5. a torch.profiler trace of one served request (512-token prompt + 8 tokens): the CUDA kernels
     it launched, counted by name (the fused kernel is `_add_rms_norm_kernel`); gzipped trace kept.

    python scripts/gpu_serve_check.py --model DIR --fast-path auto --out OUT/serve-auto.json
    python scripts/gpu_serve_check.py --report OUT      # OUT/serve-*.json (+ gpu_check.json) -> OUT/gpu-results.md
    python scripts/gpu_serve_check.py --model smollm2-135m-instruct --device cpu --prompt-tokens 256 \\
        --decode-tokens 16 --out /tmp/serve-off.json --fast-path off     # dry run of the flow on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import random
import shutil
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FUSED_KERNEL = "_add_rms_norm_kernel"
MODEL = [""]  # the served model's name, as the API wants it in every request
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def _post(url: str, body: dict, stream: bool = False):
    req = urllib.request.Request(
        url, json.dumps({"model": MODEL[0], **body}).encode(), {"Content-Type": "application/json"}
    )
    try:
        resp = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode()[:500]}") from None
    return resp if stream else json.loads(resp.read())


def _stream(url: str, body: dict) -> tuple[list[float], dict]:
    """(arrival time of every chunk that carries text, the usage) of one streamed request."""
    t, usage = [], {}
    with _post(url, {**body, "stream": True, "stream_options": {"include_usage": True}}, stream=True) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"]
            if any(c.get("text") for c in msg.get("choices", [])):
                t.append(time.perf_counter())
    return t, usage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args) -> dict:
    import torch

    from tpi_node.commands.compose import start_master
    from tpi_node.commands.serve import serve_http
    from tpi_node.settings import ServeSettings, load

    port = _free_port()
    given = dict(model=args.model, device=args.device, fast_path=args.fast_path, port=port, grpc_port=0)
    s = load(ServeSettings, {**given, "speculative": "off", "host": "127.0.0.1"}, environ={})
    t0 = time.monotonic()
    running = start_master(s, 1, 0)
    threading.Thread(target=serve_http, args=(s, running), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=5).read()
            break
        except Exception:
            if time.monotonic() - t0 > 300:
                raise RuntimeError("the master was not ready within 300 s") from None
            time.sleep(0.2)
    out: dict = {"fast_path": args.fast_path, "startup_line": running.gpu, "ready_s": time.monotonic() - t0}
    out["dtype"] = running.master.spec.dtype
    vocab, MODEL[0] = running.engine.cfg.vocab_size, running.engine.model_name
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    # warm-up (Triton compiles the fused kernel on its first call), then greedy text
    _post(base + "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    chat = _post(base + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 48, "temperature": 0})
    out["greedy_text"] = chat["choices"][0]["message"]["content"]

    rng = random.Random(17)
    prompt = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    ttft = []
    for _ in range(4):  # the first one warms the prefill shapes up
        t = time.perf_counter()
        times, _ = _stream(base + "/v1/completions", {"prompt": prompt(args.prompt_tokens), "max_tokens": 1})
        ttft.append(times[0] - t)
    out["ttft_s"], out["ttft_runs_s"] = statistics.median(ttft[1:]), ttft[1:]
    out["prompt_tokens"] = args.prompt_tokens

    rates = []
    for _ in range(3):
        body = {"prompt": prompt(16), "max_tokens": args.decode_tokens, "ignore_eos": True, "temperature": 0}
        times, usage = _stream(base + "/v1/completions", body)
        rates.append((usage["completion_tokens"] - 1) / (times[-1] - times[0]))
    out["decode_tok_s"], out["decode_runs_tok_s"] = statistics.median(rates), rates
    out["decode_tokens"] = args.decode_tokens

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        _stream(base + "/v1/completions", {"prompt": prompt(512), "max_tokens": 8, "ignore_eos": True})
        sync()
    trace = Path(args.out).with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    kernels: dict[str, int] = {}  # every GPU kernel of the process in that window (CUPTI), by name
    for e in json.loads(trace.read_text()).get("traceEvents", []):
        if e.get("cat") == "kernel":
            kernels[e["name"]] = kernels.get(e["name"], 0) + 1
    out["trace_kernels"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:25])
    out["fused_kernel_launches"] = sum(n for k, n in kernels.items() if FUSED_KERNEL in k)
    out["cuda_kernel_launches"] = sum(kernels.values())
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    out["trace"] = trace.name + ".gz"
    out["env"] = dict(
        card=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (dry run)",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=args.model,
    )
    running.stop()
    return out


def report(out_dir: Path) -> str:
    runs = {m: json.loads((out_dir / f"serve-{m}.json").read_text()) for m in ("auto", "off")}
    check = out_dir / "gpu_check.json"
    checks = json.loads(check.read_text()) if check.is_file() else {}
    on, off = runs["auto"], runs["off"]
    env = on["env"]
    same = on["greedy_text"] == off["greedy_text"]
    lines = [
        "## Serving with the fast path on and off (issue 17)",
        "",
        f"- **Card**: {env['card']}; torch {env['torch']}, CUDA {env['cuda']}",
        f"- **Date**: {env['date']}",
        "- **Command**: `bash scripts/gpu_check.sh $OUT` (serving part: `scripts/gpu_serve_check.py`, one "
        "process per mode, the master as `tpi-node serve` builds it, requests through its HTTP API)",
        f"- **Model**: `{env['model']}`, {on.get('dtype')}, one node, speculative decoding off",
        "",
        "Start-up lines (what the forward loop runs):",
        "",
        "```",
        *(f"--fast-path {m}: {r['startup_line']}" for m, r in runs.items()),
        "```",
        "",
        "| | fast path on (auto) | fast path off |",
        "|---|---:|---:|",
        f"| TTFT, {on['prompt_tokens']}-token prompt (median of 3) | {on['ttft_s'] * 1e3:.1f} ms | "
        f"{off['ttft_s'] * 1e3:.1f} ms |",
        f"| decode, {on['decode_tokens']} tokens (median of 3) | {on['decode_tok_s']:.1f} tok/s | "
        f"{off['decode_tok_s']:.1f} tok/s |",
        f"| `{FUSED_KERNEL}` launches in the trace of one request | {on['fused_kernel_launches']} | "
        f"{off['fused_kernel_launches']} |",
        f"| CUDA kernel launches in that trace | {on['cuda_kernel_launches']} | {off['cuda_kernel_launches']} |",
        "",
        f"Greedy text (48 tokens, temperature 0) **{'the same' if same else 'DIFFERENT'}** both ways:",
        "",
        "```",
        f"on:  {on['greedy_text']!r}",
        f"off: {off['greedy_text']!r}",
        "```",
        "",
        "The traces (`serve-auto.trace.json.gz`, `serve-off.trace.json.gz`): the most launched kernels,",
        "",
        "| kernel | on | off |",
        "|---|---:|---:|",
    ]
    names = list(dict.fromkeys([*on["trace_kernels"], *off["trace_kernels"]]))[:20]
    lines += [f"| `{n[:80]}` | {on['trace_kernels'].get(n, '')} | {off['trace_kernels'].get(n, '')} |" for n in names]
    if checks:
        failed = [c for c in checks.get("checks", []) if not c["ok"]]
        lines += [
            "",
            f"Kernel checks (`scripts/gpu_check.py`): {len(checks['checks']) - len(failed)}/{len(checks['checks'])} "
            "passed" + "".join(f"\n- FAIL {c['check']}: {c['detail']}" for c in failed),
        ]
        mm = [c for c in checks.get("checks", []) if c["check"].startswith("multimem")]
        lines += [f"- {c['check']}: {'PASS' if c['ok'] else 'FAIL'}, {c['detail']}" for c in mm]
    lines += [
        "",
        "What one GPU cannot show: NCCL between GPUs over NVLink, the multimem kernel on data (it needs "
        "several GPUs on NVSwitch with multicast) and the overlap of the token split (no communication to "
        "hide on one GPU); the CPU tests run that code with the gloo backend (tests/test_fast_path.py).",
    ]
    text = "\n".join(lines) + "\n"
    (out_dir / "gpu-results.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--fast-path", choices=("auto", "off"), default="auto")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--out", default="/tmp/serve.json")
    ap.add_argument("--report", metavar="OUT_DIR", help="write OUT_DIR/gpu-results.md from the runs there")
    args = ap.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return 0
    out = serve(args)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "trace_kernels"}, indent=1), flush=True)
    os._exit(0)  # uvicorn's thread and the gRPC server end with the process


if __name__ == "__main__":
    sys.exit(main())
