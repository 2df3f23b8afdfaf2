"""Speculative decoding on the namespace testbed: decode tokens/s and steps (round-trip sets) per
output token with and without prompt-lookup drafts, side by side. Needs root.

    sudo .venv/bin/python scripts/bench_speculative.py [--presets home-wifi tpi-paper] [--nodes 2 3]
         [--tokens 64] [--repeat 2]

For every preset (link rate and latency from configs/testbed/) and node count, one `tpi-node serve`
+ `tpi-node join` cluster per mode (--speculative off, lookup), each process in its own namespace;
a client inside the master's node streams two greedy chat completions:
  (a) edit:  "repeat this code with a comment on every line" - the answer copies its input;
  (b) chat:  a free question - little to copy.
Decode tokens/s = (tokens - 1) / (last token - first token); steps per token from the engine's own
counter (/metrics tpi_engine_steps, prefill included), each step being two allreduce round trips per
layer. The best of --repeat runs is kept (the testbed shares the host's cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAME, SUBNET, HTTP_PORT = "tpispec", "10.231.11.0/24", 8000
CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def factorial(n):
    """Return n factorial."""
    result = 1
    for i in range(2, n + 1):
        result = result * i
    return result
'''
WORKLOADS = {
    "edit": "Repeat this code exactly, with a short comment on every line:\n\n" + CODE,
    "chat": "Tell me a short story about a robot who learns to paint.",
}


def _steps(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        m = re.search(rb"^tpi_engine_steps_total (\S+)$", r.read(), re.M)
    return float(m.group(1)) if m else float("nan")


def client_main(a) -> None:
    """Inside the master's node: one streamed greedy chat completion per workload, best of --repeat."""
    with urllib.request.urlopen(a.url + "/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    out = {}
    for name, text in WORKLOADS.items():
        best = None
        for _ in range(a.repeat):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": a.tokens,
                "temperature": 0,
                "stream": True,
            }
            req = urllib.request.Request(
                a.url + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            steps0, stamps, t0 = _steps(a.url), [], time.perf_counter()
            with urllib.request.urlopen(req, timeout=900) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        ch = json.loads(line[6:])["choices"]
                        if ch and ch[0]["delta"].get("content"):
                            stamps.append(time.perf_counter())
            steps = _steps(a.url) - steps0
            run = {
                "ttft": stamps[0] - t0,
                "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0,
                "chunks": len(stamps),
                "steps": steps,
            }
            if best is None or run["tok_s"] > best["tok_s"]:
                best = run
        out[name] = best
    print(json.dumps(out), flush=True)


def bench(tb, preset: str, n: int, mode: str, a, home: Path) -> dict:
    from tpi_node.testbed.cluster import TestbedCluster

    with TestbedCluster(
        tb,
        a.model_dir,
        nodes=n,
        home_root=home / f"{preset}-{n}-{mode}",
        serve_args=("--speed", "1", "--speculative", mode),
        join_args=("--speed", "1"),
    ) as c:
        argv = [sys.executable, __file__, "--_client", f"http://127.0.0.1:{HTTP_PORT}"]
        argv += ["--tokens", str(a.tokens), "--repeat", str(a.repeat)]
        r = subprocess.run(
            tb.command("n0", argv),
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if r.returncode != 0:
            raise RuntimeError(f"client failed: {r.stderr[-800:]}\n{c.log('n0')[-800:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["home-wifi", "tpi-paper"])
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--_client", dest="client_url", default=None)
    a = ap.parse_args()
    if a.client_url:
        a.url = a.client_url
        return client_main(a)

    from bench_testbed import machine

    from tpi_node.testbed.netns import Testbed
    from tpi_node.testbed.presets import make_spec
    from tpi_node.weights.prepare import resolve_model

    a.model_dir = resolve_model(a.model)
    print(f"# sudo {Path(sys.executable).name} scripts/bench_speculative.py {' '.join(sys.argv[1:])}")
    print(f"# {datetime.date.today()}, {machine()}; model {a.model}, greedy chat, {a.tokens} new tokens")
    tb = Testbed(NAME, SUBNET)
    home = Path(tempfile.mkdtemp(prefix="tpi-bench-spec-"))
    rows = []
    try:
        for preset in a.presets:
            for n in a.nodes:
                spec = make_spec(preset, nodes=n, memory=None, cpus=None)
                tb.up(spec, relay=True)
                res = {mode: bench(tb, preset, n, mode, a, home) for mode in ("off", "lookup")}
                link = f"{spec.rate_bps / 1e6:g} Mbit/s, {spec.latency_ms:g} ms"
                for w in WORKLOADS:
                    off, on = res["off"][w], res["lookup"][w]
                    rows.append((preset, link, n, w, off, on))
                    print(
                        f"#   {preset} N={n} {w}: {off['tok_s']:.2f} -> {on['tok_s']:.2f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
                tb.down(quiet=True)
    finally:
        tb.down(quiet=True)
    print(
        f"\n{'preset':<10}{'link':<20}{'N':>2}  {'workload':<9}{'plain tok/s':>12}{'spec tok/s':>11}"
        f"{'speedup':>9}{'steps/tok plain':>17}{'steps/tok spec':>16}"
    )
    for preset, link, n, w, off, on in rows:
        per_off, per_on = off["steps"] / off["chunks"], on["steps"] / on["chunks"]
        print(
            f"{preset:<10}{link:<20}{n:>2}  {w:<9}{off['tok_s']:>12.2f}{on['tok_s']:>11.2f}"
            f"{on['tok_s'] / off['tok_s']:>8.2f}x{per_off:>17.2f}{per_on:>16.2f}"
        )


if __name__ == "__main__":
    main()
