"""Peak memory per node (TPI-LLM Table 2 on this machine): a synthetic Llama-2-70B-shaped model.

    python scripts/bench_memory.py [--layers 4] [--nodes 2,4,8] [--dtypes fp32,bf16] [--quants none,int4]

Synthesizes the first --layers of the 80 (the per-layer slice is what decides the window's
memory; every layer of a node has the same slice). --quants none (the default) writes bf16 weights
that each of --dtypes casts its slices to; int8 / int4 write the matrices straight as q8_0 / q4_1
blocks (`tpi-node synth --quant`; embedding and lm_head as q8_0), which the slices keep as they are
(activations and norms in each of --dtypes), so 70B shapes fit on disk. Each checkpoint is sliced
for N = 2, 4, 8 equal nodes and, for the master (rank 0: also embedding + lm_head) and the largest
worker, one fresh process per (rank, mode) opens the rank's ShardStore (W = 2 or resident) and
runs the real NodeRunner layer loop: a 16-token prefill and 4 decode steps. The collective returns
its input (each process alone; with it the activations are not the real model's, but the memory -
weights, KV cache, activations - is the same as in a cluster, and the real star allreduce's buffers
are [T, hidden]). Peak RSS is the process's VmHWM. The baseline: a process that imports torch,
grpc and tpi_node's engine, and idles. Big files are deleted as it goes (--keep to keep them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TPI_LLM_8_NODES_GB = 3.1  # TPI-LLM, Table 2: Llama-2-70B, 8 devices, peak memory per device
INT4_8_NODES_GOAL_GB = 0.6  # issue 13: the same shape, 8 nodes, W=2, int4: peak per worker
GiB = 2**30


def peak_rss() -> int:
    from tpi_node.weights.store import peak_rss_bytes  # VmHWM: not inherited from this parent

    return peak_rss_bytes()


def reset_peak() -> bool:
    """Start this process's VmHWM again from its current RSS (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_baseline() -> dict:
    import grpc  # noqa: F401
    import torch  # noqa: F401

    import tpi_node.engine.head  # noqa: F401
    import tpi_node.engine.runner  # noqa: F401

    time.sleep(0.5)
    return {"peak_rss": peak_rss()}


def child_node(a) -> dict:
    """One rank: open its store, run prefill + decode through the NodeRunner."""
    import torch

    from tpi_node.comm.collective import LocalCollective
    from tpi_node.dtypes import torch_dtype
    from tpi_node.engine.batch import BatchLayout
    from tpi_node.engine.budget import blocks_for
    from tpi_node.engine.head import ModelHead
    from tpi_node.engine.runner import NodeRunner
    from tpi_node.model.config import ModelConfig
    from tpi_node.weights.plan import PartitionPlan
    from tpi_node.weights.store import ShardStore

    torch.set_num_threads(2)
    cfg = ModelConfig.from_dir(a.model)
    share = PartitionPlan.from_json(Path(a.plan).read_text()).share_of(a.rank)
    dtype = torch_dtype(a.dtype)
    store = ShardStore(Path(a.shards), cfg, share, window=a.window)
    # the paged KV cache holds the 16 + 4 tokens of this test (the engine's pool fills block tables)
    runner = NodeRunner(cfg, store, share, LocalCollective(), dtype, kv_blocks=blocks_for(20))
    # a node under a memory budget keeps its lm_head unpacked (see ModelHead), as serve does
    head = ModelHead(a.model, cfg, dtype, prepacked=a.window is None) if a.rank == 0 else None
    # the peak of opening (the store, the runner's kernel tuning, the head) apart from the loop's
    setup_peak = peak_rss()
    separated = reset_peak()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 261, (16,), generator=gen).tolist()
    t0 = time.perf_counter()
    x = head.embed(prompt) if head else torch.randn(16, cfg.hidden_size, generator=gen).to(dtype)
    h = runner.forward(BatchLayout.one(0, 16), x)
    past = 16
    for _ in range(4):
        if head:
            tok = int(head.logits(h[-1:]).argmax())
            x = head.embed([tok])
        else:
            x = torch.randn(1, cfg.hidden_size, generator=gen).to(dtype)
        h = runner.forward(BatchLayout.one(past, 1), x)
        past += 1
    wall = time.perf_counter() - t0
    st = store.stats
    loop_peak = peak_rss() if separated else None
    return {
        "peak_rss": max(setup_peak, loop_peak or 0) if separated else peak_rss(),
        "loop_peak_rss": loop_peak,
        "setup_peak_rss": setup_peak,
        "wall_s": wall,
        "bytes_read": st.bytes_read,
        "stall_s": st.stall_s,
        "load_s": st.load_s,
        "slot_bytes": store.slot_bytes,
        "head_bytes": head.nbytes() if head else 0,
    }


def run_child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}"


def panel(r: dict) -> str:
    """A row's weights: its dtype for float slices, else the quantised format and the dtype."""
    quant = r.get("quant", "none")  # rows written before --quants have none
    return r["dtype"] if quant == "none" else f"{quant}, {r['dtype']}"


def plot(data: dict, out: Path) -> None:
    """Peak RSS vs nodes: W=2 and resident (80 layers), master and worker, one panel per weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(panel(r) for r in data["rows"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = [r for r in data["rows"] if panel(r) == name]
        for role, style in (("master", "-o"), ("worker", "-s")):
            rr = [r for r in rows if r["role"] == role]
            n = [r["nodes"] for r in rr]
            ax.plot(n, [r["w2_mib"] / 1024 for r in rr], style, label=f"{role}, W=2 (measured)")
            ax.plot(n, [r["resident_all80_gib"] for r in rr], style, alpha=0.4, label=f"{role}, all 80 layers resident")
        ax.axhline(TPI_LLM_8_NODES_GB * 1e9 / GiB, color="gray", ls="--", label="TPI-LLM, 8 nodes (3.1 GB)")
        ax.set_yscale("log")
        ax.set_xticks([r["nodes"] for r in rows])
        ax.set_xlabel("nodes")
        ax.set_title(f"Llama-2-70B shape, {name}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("peak RSS per node (GiB)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def model_name(a, quant: str) -> str:
    return a.preset if quant == "none" else f"{a.preset}-{quant}"


def checkpoint(a, quant: str) -> Path:
    """The synthetic checkpoint of --quants entry `quant` (written on first use)."""
    from tpi_node.weights.synth import synthesize

    model = Path(a.work) / model_name(a, quant)
    if not (model / "config.json").is_file():
        t = time.perf_counter()
        if quant == "none":
            # bf16 on disk (half the bytes to write); slices are cast to each benchmarked dtype.
            synthesize(a.preset, model, layers=a.layers, dtype="bf16", progress=False)
        else:
            # the blocks straight from synth (--quant): the quantised layers as TPI serves them
            synthesize(a.preset, model, layers=a.layers, dtype="fp32", quant=quant, progress=False)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        print(f"synth {quant}: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s -> {model}", flush=True)
    return model


def measure_rank(a, model: Path, plan_file: Path, rank: int, shards: Path, dtype: str) -> dict:
    """Peak memory of one rank with W = 2 and with every layer resident."""
    res = {}
    for mode, window in (("w2", "2"), ("resident", "0")):
        args = ["--child-node", "--model", str(model), "--plan", str(plan_file), "--rank", str(rank)]
        res[mode] = run_child(args + ["--shards", str(shards), "--dtype", dtype, "--window", window])
    return res


def measure(a, quant: str, dtype: str, n: int, base: int) -> list[dict]:
    """The master and the largest worker of an N-node plan: one row each."""
    from tpi_node.model.config import ModelConfig
    from tpi_node.weights.plan import NodeCapacity, make_plan
    from tpi_node.weights.slicer import write_node_shards

    work, model = Path(a.work), checkpoint(a, quant)
    cfg = ModelConfig.from_dir(model)
    plan = make_plan(cfg, [NodeCapacity(f"node{i}", 0, cores=1) for i in range(n)])
    plan_file = work / f"plan-{n}.json"
    plan_file.write_text(plan.to_json())
    worker = max(range(1, n), key=lambda r: plan.share_of(r).layer_params(cfg))
    rows = []
    for rank in (0, worker):
        shards = work / f"shards-{quant}-{dtype}-{n}-{rank}"
        t0 = time.perf_counter()
        # stored blocks stay blocks: the quantised checkpoint is sliced as it is (--quant none)
        write_node_shards(model, cfg, plan, rank, shards, dtype, progress=False)
        t_slice = time.perf_counter() - t0
        res = measure_rank(a, model, plan_file, rank, shards, dtype)
        slot = res["w2"]["slot_bytes"]
        rows.append(
            {
                "quant": quant,
                "dtype": dtype,
                "nodes": n,
                "rank": rank,
                "role": "master" if rank == 0 else "worker",
                "slice_mib": slot / 2**20,
                "head_mib": res["w2"]["head_bytes"] / 2**20,
                "w2_mib": res["w2"]["peak_rss"] / 2**20,
                "w2_loop_mib": (res["w2"]["loop_peak_rss"] or 0) / 2**20,  # 0: not separated here
                "resident_mib": res["resident"]["peak_rss"] / 2**20,
                "resident_all80_gib": (res["resident"]["peak_rss"] + (80 - a.layers) * slot) / GiB,
                "goal_mib": (2.5 * slot + base) / 2**20,
                "stall_s": res["w2"]["stall_s"],
                "wall_s": res["w2"]["wall_s"],
                "slice_s": t_slice,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if not a.keep:
            shutil.rmtree(shards)
    return rows


def print_table(a, rows: list[dict], base: int) -> None:
    print()
    print(
        f"Peak RSS per node, synthetic Llama-2-70B shape ({a.layers} of 80 layers generated; "
        f"resident at 80 layers = measured + {80 - a.layers} x slice)"
    )
    print(
        f"command: python scripts/bench_memory.py --layers {a.layers} --nodes {a.nodes} --dtypes {a.dtypes} "
        f"--quants {a.quants}"
    )
    print(f"machine: {machine()}; date: {datetime.date.today()}; baseline {base / 2**20:.0f} MiB")
    print()
    print(
        "| weights | dtype | nodes | node | layer slice | W=2 peak | W=2 peak in the layer loop | "
        f"goal 2.5 x slice + baseline | resident peak ({a.layers} layers) | resident, all 80 layers | "
        "TPI-LLM (8 nodes, fp32) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tpi = f"{TPI_LLM_8_NODES_GB:.1f} GB" if r["nodes"] == 8 else ""
        extra = f" (+ head {r['head_mib']:.0f} MiB)" if r["role"] == "master" else ""
        ok = "yes" if r["w2_mib"] - r["head_mib"] <= r["goal_mib"] else "no"
        weights = "float" if r["quant"] == "none" else r["quant"]
        print(
            f"| {weights} | {r['dtype']} | {r['nodes']} | {r['role']}{extra} | {r['slice_mib']:.0f} MiB | "
            f"{r['w2_mib'] / 1024:.2f} GiB ({r['w2_mib'] * 2**20 / 1e9:.2f} GB) | {loop_text(r)} | "
            f"{r['goal_mib'] / 1024:.2f} GiB ({ok}) | "
            f"{r['resident_mib'] / 1024:.2f} GiB | {r['resident_all80_gib']:.1f} GiB | {tpi} |"
        )
    print(
        "W=2 peak = VmHWM over the whole process; in the layer loop = VmHWM reset after the store, the "
        "runner (its quantised-kernel tuning included) and the head were opened"
    )
    for r in rows:
        if r["quant"] == "int4" and r["nodes"] == 8 and r["role"] == "worker":
            gb = r["w2_mib"] * 2**20 / 1e9
            met = "met" if gb <= INT4_8_NODES_GOAL_GB else "not met"
            print(
                f"issue 13 goal, int4 ({r['dtype']}), 8 nodes, W=2: worker peak {gb:.2f} GB <= "
                f"{INT4_8_NODES_GOAL_GB} GB: {met} (layer loop alone: {r.get('w2_loop_mib', 0) * 2**20 / 1e9:.2f} GB)"
            )


def loop_text(r: dict) -> str:
    mib = r.get("w2_loop_mib", 0)  # rows written before this column have none
    return f"{mib / 1024:.2f} GiB ({mib * 2**20 / 1e9:.2f} GB)" if mib else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-70b", help="model shape (a smaller one for a quick try)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--nodes", default="2,4,8")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--quants", default="none", help="comma list: none (float slices), int8, int4 (synth --quant)")
    p.add_argument("--work", default="/tmp/tpi-bench-memory")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--plot", default=None, help="also draw peak memory vs nodes into this PNG")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="just draw --plot from a --json file")
    a = p.parse_args()
    if a.plot_only:
        plot(json.loads(Path(a.plot_only).read_text()), Path(a.plot))
        return

    Path(a.work).mkdir(parents=True, exist_ok=True)
    base = run_child(["--child-baseline"])["peak_rss"]
    print(f"baseline (python + torch + grpc + tpi_node engine, idle): {base / 2**20:.0f} MiB", flush=True)
    rows = []
    for quant in a.quants.split(","):
        for dtype in a.dtypes.split(","):
            for n in [int(x) for x in a.nodes.split(",")]:
                rows += measure(a, quant, dtype, n, base)
        if not a.keep:
            shutil.rmtree(Path(a.work) / model_name(a, quant), ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"baseline_mib": base / 2**20, "rows": rows}, indent=1))
    if a.plot:
        plot({"baseline_mib": base / 2**20, "rows": rows}, Path(a.plot))
    print_table(a, rows, base)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-baseline":
        print(json.dumps(child_baseline()))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-node":
        cp = argparse.ArgumentParser()
        cp.add_argument("--child-node", action="store_true")
        for f in ("--model", "--plan", "--shards", "--dtype"):
            cp.add_argument(f)
        cp.add_argument("--rank", type=int)
        cp.add_argument("--window", type=int)
        ca = cp.parse_args()
        ca.window = ca.window or None
        print(json.dumps(child_node(ca)))
    else:
        main()
