"""Per-token decode latency of a local cluster (master in this process, workers as real
`tpi-node join` processes on loopback) at 1, 2 and 3 nodes, with the master's breakdown, next to
2 x layers x the measured star allreduce latency (one token, fp32 wire).

    python scripts/bench_cluster.py [--model smollm2-135m-instruct] [--tokens 32] [--nodes 1 2 3]

compute = master's own layer math; comm = inside allreduces (wire + waiting for the slowest
worker); stall = waiting for weights (streaming window). overhead = ms/token - 1-node ms/token.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_cluster(model_dir: Path, nodes: int, tokens: int, home: Path) -> dict:
    from tpi_node.commands.compose import start_master
    from tpi_node.model.sampling_params import SamplingParams
    from tpi_node.settings import MasterSettings

    os.environ["TPI_HOME"] = str(home / "master")
    # one token per step (no speculative drafts): this measures what one step costs
    s = MasterSettings(model=str(model_dir), dtype="fp32", device="cpu", node_id="master", speed=1.0, speculative="off")
    running = start_master(s, nodes, 0)
    master, engine, port = running.master, running.engine, running.port
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tpi_node.cli",
                "join",
                "--master",
                f"127.0.0.1:{port}",
                "--node-id",
                f"w{i}",
                "--device",
                "cpu",
                "--speed",
                "1",
            ],
            env={**os.environ, "TPI_HOME": str(home / f"w{i}")},
            stderr=subprocess.DEVNULL,
        )
        for i in range(1, nodes)
    ]
    try:
        while not master.ready():
            time.sleep(0.05)
        prompt = list(range(100, 116))
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        list(engine.generate_sync(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
        r = master.coordinator.deployment.runner
        stamps = []
        for _ in engine.generate_sync(prompt, params):
            stamps.append(time.perf_counter())
            if len(stamps) == 1:  # prefill done: measure decode steps only
                r.stats.__init__()
        n = len(stamps) - 1
        s = r.stats
        return {
            "ms_token": (stamps[-1] - stamps[0]) / n * 1e3,
            "compute": s.compute_s / n * 1e3,
            "comm": s.comm_s / n * 1e3,
            "stall": s.stall_s / n * 1e3,
            "layers": engine.cfg.num_layers,
        }
    finally:
        engine.shutdown()
        master.stop()
        for w in workers:
            w.kill()
            w.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    a = ap.parse_args()
    import bench_allreduce
    import torch

    from tpi_node.weights.prepare import resolve_model

    torch.set_num_threads(1)
    model_dir = resolve_model(a.model)
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()}, {os.cpu_count()} cores, {a.model}, fp32, "
        f"{a.tokens} decode tokens, loopback"
    )
    print(
        f"{'nodes':>5} | {'ms/token':>8} {'compute':>8} {'comm':>8} {'stall':>6} | {'overhead':>8} "
        f"{'2*L*star':>8} {'ratio':>5}"
    )
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in a.nodes:
            r = run_cluster(model_dir, nodes, a.tokens, Path(tmp) / f"n{nodes}")
            if nodes == 1:
                base = r["ms_token"]
                print(f"{nodes:>5} | {r['ms_token']:>8.2f} {r['compute']:>8.2f} {r['comm']:>8.2f} {r['stall']:>6.2f} |")
                continue
            times = bench_allreduce.measure(bench_allreduce.star_rank, nodes, 1, 300, "fp32")
            star_ms = times[len(times) // 2] * 1e3
            budget = 2 * r["layers"] * star_ms
            over = r["ms_token"] - base if base is not None else float("nan")
            print(
                f"{nodes:>5} | {r['ms_token']:>8.2f} {r['compute']:>8.2f} {r['comm']:>8.2f} {r['stall']:>6.2f} | "
                f"{over:>8.2f} {budget:>8.2f} {over / budget:>5.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
