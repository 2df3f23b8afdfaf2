"""The token split over the star on the namespace testbed: time to first token of a long prompt
with `--token-split off` and with the split, side by side. Needs root.

    sudo .venv/bin/python scripts/bench_split.py [--presets home-wifi] [--nodes 3] [--prompt-tokens 2000]
         [--splits off auto] [--wire fp32] [--repeat 2]

    # where the split starts to pay (for --token-split auto): short prompts, every step split
    sudo .venv/bin/python scripts/bench_split.py --presets home-wifi tpi-paper local \
         --prompt-tokens 32 64 128 256 512 --splits off 2

For every preset (link rate and latency from configs/testbed/) and node count, one `tpi-node serve`
+ `tpi-node join` cluster per --token-split value, each process in its own namespace (no CPU or
memory cap: the nodes share the host's cores); a client inside the master's node sends greedy
completions of `--prompt-tokens` token ids (1 new token, no prefix cache, so every run prefills the
whole prompt in 512-token chunks) and times the first token. The best of --repeat runs is kept
(the testbed shares the host's cores); the table gives each mode's TTFT and its ratio to "off".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAME, SUBNET, HTTP_PORT = "tpisplt", "10.231.21.0/24", 8000
TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany, France "
    "and England tried to build a machine that a person could ride without a horse. "
)


def client_main(a) -> None:
    """Inside the master's node: for each prompt, --repeat completions, the best TTFT kept."""
    prompts = json.loads(Path(a.prompt_file).read_text())
    with urllib.request.urlopen(a.url + "/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    out = {}
    for n, prompt in prompts.items():
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
        runs = []
        for _ in range(a.repeat):
            req = urllib.request.Request(
                a.url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            t0, first = time.perf_counter(), None
            with urllib.request.urlopen(req, timeout=1800) as r:
                for line in r:
                    if first is None and line.startswith(b"data: {"):
                        first = time.perf_counter()
            runs.append(first - t0)
        out[n] = {"ttft": min(runs), "runs": runs}
    print(json.dumps(out), flush=True)


def bench(tb, tag: str, split: str, a, home: Path) -> dict:
    from tpi_node.testbed.cluster import TestbedCluster

    serve = ("--speed", "1", "--no-prefix-cache", "--wire", a.wire, "--token-split", split)
    with TestbedCluster(
        tb, a.model_dir, nodes=a.n, home_root=home / f"{tag}-{split}", serve_args=serve, join_args=("--speed", "1")
    ) as c:
        argv = [sys.executable, __file__, "--_client", f"http://127.0.0.1:{HTTP_PORT}"]
        argv += ["--prompt-file", str(a.prompt_file), "--repeat", str(a.repeat)]
        r = subprocess.run(
            tb.command("n0", argv),
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if r.returncode != 0:
            raise RuntimeError(f"client failed: {r.stderr[-800:]}\n{c.log('n0')[-1500:]}")
        said = [ln for ln in c.log("n0", tail=20000).splitlines() if "token split" in ln]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return {int(n): {**r, "said": said[-1].split("] ", 1)[-1] if said else ""} for n, r in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["home-wifi"])
    ap.add_argument("--nodes", type=int, nargs="+", default=[3])
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[2000])
    ap.add_argument("--splits", nargs="+", default=["off", "auto"], help="--token-split values; the first is the base")
    ap.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--_client", dest="client_url", default=None)
    ap.add_argument("--prompt-file", default=None)
    a = ap.parse_args()
    if a.client_url:
        a.url = a.client_url
        return client_main(a)

    from bench_testbed import machine

    from tpi_node.model.tokenizer import Tokenizer
    from tpi_node.testbed.netns import Testbed
    from tpi_node.testbed.presets import make_spec
    from tpi_node.weights.prepare import resolve_model

    a.model_dir = resolve_model(a.model)
    home = Path(tempfile.mkdtemp(prefix="tpi-bench-split-"))
    ids = Tokenizer.from_dir(a.model_dir).encode(TEXT * (max(a.prompt_tokens) // 20 + 1))
    a.prompt_file = home / "prompts.json"
    a.prompt_file.write_text(json.dumps({n: ids[:n] for n in a.prompt_tokens}))
    load = os.getloadavg()
    print(f"# sudo {Path(sys.executable).name} scripts/bench_split.py {' '.join(sys.argv[1:])}")
    print(
        f"# {datetime.date.today()}, {machine()}; load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; model {a.model}, "
        f"prompts of {', '.join(map(str, a.prompt_tokens))} tokens, wire {a.wire}, best of {a.repeat}"
    )
    tb = Testbed(NAME, SUBNET)
    rows = []
    try:
        for preset in a.presets:
            for n in a.nodes:
                a.n = n
                spec = make_spec(preset, nodes=n, memory=None, cpus=None)
                tb.up(spec, relay=True)
                res = {}
                for split in a.splits:
                    res[split] = bench(tb, f"{preset}-{n}", split, a, home)
                    print(f"#   {preset} N={n} --token-split {split}: {res[split]}", file=sys.stderr, flush=True)
                rate = f"{spec.rate_bps / 1e6:g} Mbit/s" if spec.rate_bps else "unshaped"
                rows.append((preset, f"{rate}, {spec.latency_ms:g} ms", n, res))
                tb.down(quiet=True)
    finally:
        tb.down(quiet=True)
    base = a.splits[0]
    print(
        f"\n{'preset':<12}{'link':<20}{'N':>2}{'prompt':>7}  {'--token-split':<14}{'TTFT s':>8}{'vs ' + base:>9}"
        "  runs (s)"
    )
    for preset, link, n, res in rows:
        for tokens in a.prompt_tokens:
            for split, per in res.items():
                r = per[tokens]
                runs = " ".join(f"{t:.2f}" for t in r["runs"])
                ratio = r["ttft"] / res[base][tokens]["ttft"]
                print(f"{preset:<12}{link:<20}{n:>2}{tokens:>7}  {split:<14}{r['ttft']:>8.2f}{ratio:>8.2f}x  {runs}")
    for preset, _, n, res in rows:
        for split, per in res.items():
            print(f"# {preset} N={n} {split}: {next(iter(per.values()))['said']}")


if __name__ == "__main__":
    main()
