"""Per-token decode latency of a local cluster (master in this process, workers as real
`tpi-node join` processes on loopback) at 1, 2 and 3 nodes, with the master's breakdown, next to
2 x layers x the measured star allreduce latency (one token, fp32 wire), and the master's lm_head
time per token with the head whole on the master and split by vocabulary (--head-split).

    python scripts/bench_cluster.py [--model smollm2-135m-instruct] [--tokens 32] [--nodes 1 2 3]
    python scripts/bench_cluster.py --nodes 1 2 --session auto off   # Unix-socket sessions vs gRPC
    python scripts/bench_cluster.py --synth llama3.2-1b --nodes 4 --head-split off on --tokens 8

compute = master's own layer math; comm = inside allreduces (wire + waiting for the slowest
worker); stall = waiting for weights (streaming window). overhead = ms/token - 1-node ms/token.
Threads as `run` gives them: one node uses every core, N local nodes each get their share (the
master's torch threads, the workers' OMP_NUM_THREADS). session = the workers' --local-session:
auto runs their sessions on the master's Unix socket (they dial it over loopback), off on gRPC;
2*L*star is measured on the same transport. x1 = 1-node ms/token / this ms/token: the cluster's
tokens/s as a fraction of one node's.
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


def head_alone(engine, runner, reps: int = 20) -> float:
    """Seconds of the master's own head work for one row while every other process is idle: the
    whole lm_head's logits, or (split) its rows' logits and candidates. On a machine with a core
    per node this is what the master's head costs; here the nodes share the cores."""
    import torch

    from tpi_node.model.candidates import RowAsk, pack_rows

    h = torch.randn(1, engine.cfg.hidden_size)
    if engine.head.split:
        work = lambda: pack_rows(runner.head.logits(h), runner.head.start, [RowAsk()])  # noqa: E731
    else:
        work = lambda: engine.head.logits(h)  # noqa: E731
    work()
    t0 = time.perf_counter()
    for _ in range(reps):
        work()
    return (time.perf_counter() - t0) / reps


def run_cluster(
    model_dir: Path,
    nodes: int,
    tokens: int,
    home: Path,
    head_split: str = "off",
    dtype: str = "fp32",
    collective: str = "star",
    session: str = "auto",
) -> dict:
    import torch

    from tpi_node.commands.compose import start_master
    from tpi_node.commands.local_cluster import share_cores
    from tpi_node.engine.device import cpu_cores
    from tpi_node.model.sampling_params import SamplingParams
    from tpi_node.settings import MasterSettings

    # threads as `run` gives them (one node: every core; N local nodes: each its share of them)
    threads = share_cores(nodes) if nodes > 1 else cpu_cores()
    torch.set_num_threads(threads)
    os.environ["TPI_HOME"] = str(home / "master")
    # one token per step (no speculative drafts): this measures what one step costs
    s = MasterSettings(
        model=str(model_dir),
        dtype=dtype,
        device="cpu",
        node_id="master",
        speed=1.0,
        speculative="off",
        head_split=head_split,
        collective=collective,
    )
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
                "--local-session",
                session,
            ],
            env={**os.environ, "TPI_HOME": str(home / f"w{i}"), "OMP_NUM_THREADS": str(threads)},
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
                head0 = engine.counters.head_s
        n = len(stamps) - 1
        s = r.stats
        whole = engine.counters.head_s - head0
        alone = head_alone(engine, r)
        return {
            "ms_token": (stamps[-1] - stamps[0]) / n * 1e3,
            "compute": s.compute_s / n * 1e3,
            "comm": s.comm_s / n * 1e3,
            "stall": s.stall_s / n * 1e3,
            "head": (s.head_s + whole) / n * 1e3,
            "head_own": (s.head_s - s.head_comm_s + whole) / n * 1e3,
            "head_alone": alone * 1e3,
            "split": engine.head.split,
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
    ap.add_argument("--head-split", nargs="+", default=["off"], choices=("off", "on"), help="run each (default off)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--collective", default="star", choices=("star", "gloo"), help="what sums the partials")
    ap.add_argument("--session", nargs="+", default=["auto"], choices=("auto", "off"), help="workers' --local-session")
    ap.add_argument("--synth", metavar="PRESET", help="a synthetic checkpoint of this shape instead of --model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tpi-bench-cluster"), help="where --synth writes it")
    a = ap.parse_args()
    import bench_allreduce

    from tpi_node.weights.prepare import resolve_model

    if a.synth:
        model_dir, name = a.work / a.synth, a.synth
        if not (model_dir / "config.json").is_file():
            cmd = [sys.executable, "-m", "tpi_node.cli", "synth", "--preset", a.synth, "--out", str(model_dir)]
            subprocess.run(cmd, check=True)
    else:
        model_dir, name = resolve_model(a.model), a.model
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()}, {os.cpu_count()} cores, {name}, {a.dtype}, "
        f"{a.tokens} decode tokens, loopback, {a.collective}"
    )
    print(
        f"{'nodes':>5} {'head':>5} {'session':>7} | {'ms/token':>8} {'compute':>8} {'comm':>8} {'stall':>6} | "
        f"{'head ms':>7} {'own':>6} {'vs off':>6} {'alone':>6} {'vs off':>6} | {'overhead':>8} {'2*L*star':>8} "
        f"{'ratio':>5} {'x1':>5}"
    )
    base, head_off, alone_off = None, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in a.nodes:
            star_ms = {}
            for session in a.session if nodes > 1 else []:  # the allreduce on the workers' transport
                with tempfile.TemporaryDirectory() as unix_dir:
                    extra = (0, "", unix_dir) if session == "auto" else ()
                    times = bench_allreduce.measure(bench_allreduce.star_rank, nodes, 1, 300, "fp32", *extra)
                star_ms[session] = times[len(times) // 2] * 1e3
            for mode, session in [(m, x) for m in a.head_split for x in (a.session if nodes > 1 else ["-"])]:
                r = run_cluster(
                    model_dir, nodes, a.tokens, Path(tmp) / f"n{nodes}", mode, a.dtype, a.collective, session
                )
                if not r["split"]:
                    head_off[nodes], alone_off[nodes] = r["head"], r["head_alone"]
                vs = r["head"] / head_off[nodes] if r["split"] and nodes in head_off else float("nan")
                vs_alone = r["head_alone"] / alone_off[nodes] if r["split"] and nodes in alone_off else float("nan")
                if nodes == 1 and mode == a.head_split[0]:
                    base = r["ms_token"]
                star = ""
                if nodes > 1:
                    budget = 2 * r["layers"] * star_ms[session]
                    over = r["ms_token"] - base if base is not None else float("nan")
                    x1 = base / r["ms_token"] if base is not None else float("nan")
                    star = f"{over:>8.2f} {budget:>8.2f} {over / budget:>5.2f} {x1:>5.2f}"
                print(
                    f"{nodes:>5} {mode:>5} {session:>7} | {r['ms_token']:>8.2f} {r['compute']:>8.2f} "
                    f"{r['comm']:>8.2f} {r['stall']:>6.2f} | {r['head']:>7.2f} {r['head_own']:>6.2f} {vs:>6.2f} "
                    f"{r['head_alone']:>6.2f} {vs_alone:>6.2f} | {star}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
