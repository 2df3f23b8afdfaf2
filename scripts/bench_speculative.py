"""Speculative decoding on the namespace testbed: decode tokens/s and steps (round-trip sets) per
output token without drafts, with prompt-lookup drafts and with a draft model, side by side. Needs root.

    sudo .venv/bin/python scripts/bench_speculative.py [--presets home-wifi tpi-paper] [--nodes 2 3]
         [--tokens 64] [--repeat 2] [--modes off lookup draft] [--draft-model M] [--draft-quant int4]

For every preset (link rate and latency from configs/testbed/) and node count, one `tpi-node serve`
+ `tpi-node join` cluster per mode (--speculative off, lookup, draft: --draft-model, by default the
model itself at --draft-quant int4, run by the master alone), each process in its own namespace;
a client inside the master's node streams two greedy chat completions:
  (a) edit:  "repeat this code with a comment on every line" - the answer copies its input;
  (b) chat:  a free question - little to copy.
Decode tokens/s = (tokens - 1) / (last token - first token); steps per token from the engine's own
counter (/metrics tpi_engine_steps, prefill included), each step being two allreduce round trips per
layer; drafts accepted / proposed from tpi_draft_tokens_*. The best of --repeat runs is kept (the
testbed shares the host's cores, and the draft model runs on the master's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
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


MODES = ("off", "lookup", "draft")
COUNTERS = ("tpi_engine_steps_total", "tpi_draft_tokens_proposed_total", "tpi_draft_tokens_accepted_total")


def _counters(url: str) -> list[float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read()
    out = []
    for name in COUNTERS:
        m = re.search(rb"^" + name.encode() + rb" (\S+)$", text, re.M)
        out.append(float(m.group(1)) if m else float("nan"))
    return out


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
            before, stamps, t0 = _counters(a.url), [], time.perf_counter()
            with urllib.request.urlopen(req, timeout=900) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        ch = json.loads(line[6:])["choices"]
                        if ch and ch[0]["delta"].get("content"):
                            stamps.append(time.perf_counter())
            steps, proposed, accepted = (y - x for x, y in zip(before, _counters(a.url)))
            run = {
                "ttft": stamps[0] - t0,
                "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0,
                "chunks": len(stamps),
                "steps": steps,
                "proposed": proposed,
                "accepted": accepted,
            }
            if best is None or run["tok_s"] > best["tok_s"]:
                best = run
        out[name] = best
    print(json.dumps(out), flush=True)


def bench(tb, preset: str, n: int, mode: str, a, home: Path) -> dict:
    from tpi_node.testbed.cluster import TestbedCluster

    serve_args = ("--speed", "1", "--speculative", mode)
    if mode == "draft":
        serve_args += ("--draft-model", str(a.draft_model_dir), "--draft-quant", a.draft_quant)
    with TestbedCluster(
        tb,
        a.model_dir,
        nodes=n,
        home_root=home / f"{preset}-{n}-{mode}",
        serve_args=serve_args,
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
    out = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(home / f"{preset}-{n}-{mode}", ignore_errors=True)  # the nodes' shard caches
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["home-wifi", "tpi-paper"])
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--draft-model", default=None, help="the draft mode's --draft-model (default: --model)")
    ap.add_argument("--draft-quant", default="int4", choices=("none", "int8", "int4"))
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
    a.draft_model_dir = resolve_model(a.draft_model or a.model)
    print(f"# sudo {Path(sys.executable).name} scripts/bench_speculative.py {' '.join(sys.argv[1:])}")
    print(f"# {datetime.date.today()}, {machine()}; model {a.model}, greedy chat, {a.tokens} new tokens")
    if "draft" in a.modes:
        print(f"# draft mode: --draft-model {a.draft_model or a.model} --draft-quant {a.draft_quant}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tb = Testbed(NAME, SUBNET)
    home = Path(tempfile.mkdtemp(prefix="tpi-bench-spec-"))
    rows = []
    try:
        for preset in a.presets:
            for n in a.nodes:
                spec = make_spec(preset, nodes=n, memory=None, cpus=None)
                tb.up(spec, relay=True)
                res = {mode: bench(tb, preset, n, mode, a, home) for mode in a.modes}
                link = f"{spec.rate_bps / 1e6:g} Mbit/s, {spec.latency_ms:g} ms"
                for w in WORKLOADS:
                    rows.append((preset, link, n, w, {m: res[m][w] for m in a.modes}))
                    line = " / ".join(f"{m} {res[m][w]['tok_s']:.2f}" for m in a.modes)
                    print(f"#   {preset} N={n} {w}: {line} tok/s", file=sys.stderr, flush=True)
                tb.down(quiet=True)
    finally:
        tb.down(quiet=True)
        shutil.rmtree(home, ignore_errors=True)
    print(f"# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = a.modes[0]
    head = f"\n{'preset':<10}{'link':<20}{'N':>2}  {'workload':<9}"
    head += "".join(f"{m + ' tok/s':>14}" for m in a.modes)
    head += "".join(f"{m + ' x':>10}" for m in a.modes[1:])
    head += "".join(f"{m + ' steps/tok':>17}" for m in a.modes)
    head += "".join(f"{m + ' acc.':>12}" for m in a.modes if m != "off")
    print(head)
    for preset, link, n, w, r in rows:
        line = f"{preset:<10}{link:<20}{n:>2}  {w:<9}"
        line += "".join(f"{r[m]['tok_s']:>14.2f}" for m in a.modes)
        line += "".join(f"{r[m]['tok_s'] / r[base]['tok_s']:>9.2f}x" for m in a.modes[1:])
        line += "".join(f"{r[m]['steps'] / r[m]['chunks']:>17.2f}" for m in a.modes)
        line += "".join(
            f"{r[m]['accepted'] / r[m]['proposed'] if r[m]['proposed'] else 0:>12.2f}" for m in a.modes if m != "off"
        )
        print(line)


if __name__ == "__main__":
    main()
