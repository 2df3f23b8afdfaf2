"""Load test of the OpenAI-compatible API: streaming chat clients at several concurrencies.

    python scripts/loadtest.py                                  # a server already on :8000
    python scripts/loadtest.py --serve smollm2-135m-instruct    # start one (subprocess) first
    python scripts/loadtest.py --serve tiny-llama --concurrency 1,4,8,16 --requests 2

Bounded: each level sends at most `requests x concurrency` requests and stops sending after
`--level-seconds`; only loopback URLs are accepted. Every request asks for exactly
`--max-tokens` tokens (ignore_eos), so tokens/s compare across levels. Per level it prints
TTFT p50/p95 (request sent -> first SSE chunk, which the server sends with the first token),
time per output token p50 ((last chunk - first chunk) / (tokens - 1)), aggregate output
tokens/s (all tokens / level wall time) and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

try:  # openai >= 3 ships on httpx2; older clients on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint. Use simple words."


@dataclass
class Level:
    concurrency: int
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    requests: int = 0
    wall: float = 0.0
    first_error: str = ""


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, level: Level) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    t_first = t_last = None
    tokens = 0
    level.requests += 1
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"]:
                    t_first = t_first or now
                    t_last = now
    except Exception as exc:
        level.errors += 1
        level.first_error = level.first_error or str(exc)[:200]
        return
    if t_first is None or tokens == 0:
        level.errors += 1
        level.first_error = level.first_error or "no tokens came back"
        return
    level.ttft.append(t_first - t0)
    if tokens > 1:
        level.tpot.append((t_last - t_first) / (tokens - 1))
    level.tokens += tokens


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int, seconds: float) -> Level:
    level = Level(concurrency)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            for _ in range(requests):
                if time.perf_counter() > deadline:
                    return
                await one_request(client, url, model, max_tokens, level)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        level.wall = time.perf_counter() - t0
    return level


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"loadtest: error: only loopback URLs are allowed, got {url}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, dtype: str, threads: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--server-only",
        model,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(cmd, env=env)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 600.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit("loadtest: error: the server exited before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"loadtest: error: no healthy server at {url}")


def server_only(model: str, port: int, dtype: str, threads: int) -> None:
    """The subprocess: one local engine behind the API on 127.0.0.1:port (own process, so the
    load generator does not share a GIL with the engine)."""
    import torch
    import uvicorn

    # Leave a core to the event loop and the load generator (both share this machine).
    torch.set_num_threads(threads)

    from tpi_node.commands.compose import build_local_engine
    from tpi_node.model.presets import get_preset
    from tpi_node.server.app import create_app

    path = model
    try:
        get_preset(model)
        if not Path(model).exists() and model.startswith("tiny-"):
            import tempfile

            from tpi_node.weights.synth import synthesize

            path = synthesize(model, Path(tempfile.mkdtemp(prefix="loadtest-")) / model, progress=False)
    except Exception:
        pass
    engine = build_local_engine(path, dtype=dtype, progress=False)
    app = create_app(engine, engine.tokenizer, model_name=engine.model_name)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument(
        "--serve",
        metavar="MODEL",
        help="start a 1-node server on a free port first (a model name, a directory, or a tiny-* preset to synthesize)",
    )
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--level-seconds", type=float, default=120.0, help="stop starting new requests in a level after this long"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads of the --serve server (default: cores - 1)",
    )
    ap.add_argument("--server-only", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.server_only:
        server_only(a.server_only, a.port, a.dtype, a.threads)
        return

    proc = None
    url = a.url.rstrip("/")
    if a.serve:
        url = f"http://127.0.0.1:{free_port()}"
        proc = start_server(a.serve, int(url.rsplit(":", 1)[1]), a.dtype, a.threads)
    check_loopback(url)
    try:
        model = wait_healthy(url, proc)
        asyncio.run(run_level(url, model, 1, 1, 4, 60))  # warm-up, not reported
        levels = [
            asyncio.run(run_level(url, model, int(c), a.requests, a.max_tokens, a.level_seconds))
            for c in a.concurrency.split(",")
        ]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\ncommand: python scripts/loadtest.py {' '.join(sys.argv[1:])}")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}; date {datetime.now():%Y-%m-%d %H:%M}"
    )
    print(f"model: {model}, {a.max_tokens} output tokens per request, streaming chat\n")
    base = levels[0].tokens / levels[0].wall if levels and levels[0].wall else 0.0
    hdr = ("clients", "requests", "TTFT p50 s", "TTFT p95 s", "TPOT p50 ms", "out tok/s", "x single", "errors")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join("---:" for _ in hdr) + "|")
    for lv in levels:
        tps = lv.tokens / lv.wall if lv.wall else 0.0
        print(
            f"| {lv.concurrency} | {lv.requests} | {pct(lv.ttft, 0.5):.3f} | {pct(lv.ttft, 0.95):.3f}"
            f" | {pct(lv.tpot, 0.5) * 1000:.1f} | {tps:.1f} | {tps / base if base else 0:.2f}"
            f" | {lv.errors} |"
        )
    for lv in levels:
        if lv.first_error:
            print(f"first error at {lv.concurrency} clients: {lv.first_error}")
    if any(lv.errors for lv in levels):
        sys.exit(1)


if __name__ == "__main__":
    main()
