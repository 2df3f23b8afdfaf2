"""Token latency under one memory budget (TPI-LLM Table 3 on this machine).

    python scripts/bench_latency.py [--preset llama2-7b] [--layers 6] [--nodes 1,2,4] [--new-tokens 6]

A synthetic Llama-2-7B-shaped model (fp32, --layers of its 32 layers). Every contender runs in its
own real memory cgroup (tests/cgroup_util.py) with the same limit - the budget with which one
tpi-node node holds a window of W = 2 layers next to the embedding/lm_head, KV cache, activations
and the runtime - and the page cache is dropped before each run, so weights beyond the budget
really come from disk (cgroup v1 also charges the page cache to the limit):

  tpi-node N nodes  N processes, each its own cgroup of the budget, each a ShardStore (W = 2) +
                    NodeRunner; rank 0 also embeds and samples. Collective: torch.distributed gloo
                    all_reduce over loopback (tpi_node.comm.torch_dist; the gRPC cluster was not
                    ready when this was written); rank 0 broadcasts each step's hidden states.
  accelerate        transformers + accelerate disk offload: device_map="auto",
                    max_memory={"cpu": budget - its measured runtime}, offload_folder.
  transformers      plain from_pretrained, no limit (it does not fit the budget; the compute floor).

Printed beside: the disk bound = bytes streamed per token / cold read bandwidth (measured in this
run after dropping the page cache) and the stall (time the forward waited for weights).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB, MiB = 2**30, 2**20
HF_RUNTIME = 700 * MiB  # python + torch + transformers + accelerate, before weights (measured ~650 MB)


def prompt_ids(n: int) -> list[int]:
    import torch

    return torch.randint(5, 261, (n,), generator=torch.Generator().manual_seed(1)).tolist()


# ---- children -------------------------------------------------------------------------------


def child_tpi(a) -> dict:
    import torch
    import torch.distributed as dist

    from tpi_node.comm.collective import LocalCollective
    from tpi_node.comm.torch_dist import GlooCollective
    from tpi_node.engine.batch import BatchLayout
    from tpi_node.engine.budget import blocks_for
    from tpi_node.engine.head import ModelHead
    from tpi_node.engine.runner import NodeRunner
    from tpi_node.model.config import ModelConfig
    from tpi_node.weights.plan import PartitionPlan
    from tpi_node.weights.store import ShardStore, peak_rss_bytes

    torch.set_num_threads(a.threads)
    cfg = ModelConfig.from_dir(a.model)
    share = PartitionPlan.from_json(Path(a.plan).read_text()).share_of(a.rank)
    coll = GlooCollective(a.init, a.rank, a.world, timeout_s=600) if a.world > 1 else LocalCollective()
    store = ShardStore(Path(a.shards), cfg, share, window=a.window or None)
    ids, out, times = prompt_ids(a.prompt), [], []
    runner = NodeRunner(cfg, store, share, coll, torch.float32, kv_blocks=blocks_for(len(ids) + a.new_tokens))
    head = ModelHead(a.model, cfg) if a.rank == 0 else None
    t0 = time.perf_counter()
    past, new = 0, ids
    for _ in range(a.new_tokens):
        x = head.embed(new) if head else torch.empty(len(new), cfg.hidden_size)
        if a.world > 1:
            dist.broadcast(x, src=0)
        h = runner.forward(BatchLayout.one(past, len(new)), x)
        past += len(new)
        if head:
            out.append(int(head.logits(h[-1:]).argmax()))
        new = [out[-1] if head else 0]
        times.append(time.perf_counter() - t0)
    st = store.stats
    res = {
        "ids": out,
        "ttft_s": times[0],
        "s_per_token": (times[-1] - times[0]) / (len(times) - 1),
        "bytes_read": st.bytes_read,
        "stall_s": st.stall_s,
        "load_s": st.load_s,
        "wall_s": times[-1],
        "steps": len(times),
        "peak_rss": peak_rss_bytes(),
        "window": store.window,
        "comm_s": coll.stats.seconds,
    }
    runner.close()
    return res


def child_hf(a) -> dict:
    import torch
    import transformers

    from tpi_node.weights.store import peak_rss_bytes

    torch.set_num_threads(a.threads)
    kw = {"torch_dtype": torch.float32}
    if a.max_memory:
        kw.update(device_map="auto", max_memory={"cpu": int(a.max_memory)}, offload_folder=a.offload)
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, **kw).eval()
    load_s = time.perf_counter() - t
    placement = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        placement[str(dev)] = placement.get(str(dev), 0) + 1
    ids, out, times = prompt_ids(a.prompt), [], []
    t0, past = time.perf_counter(), None
    inp = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(a.new_tokens):
            r = model(inp, past_key_values=past, use_cache=True)
            past = r.past_key_values
            out.append(int(r.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]])
            times.append(time.perf_counter() - t0)
    return {
        "ids": out,
        "ttft_s": times[0],
        "s_per_token": (times[-1] - times[0]) / (len(times) - 1),
        "load_s": load_s,
        "placement": placement,
        "peak_rss": peak_rss_bytes(),
    }


# ---- parent ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_read_bandwidth(files: list[Path]) -> float:
    """Bytes/s reading files right after dropping the page cache."""
    from tests.cgroup_util import drop_page_cache

    drop_page_cache()
    t, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 * MiB):
                n += len(chunk)
    return n / (time.perf_counter() - t)


def spawn(cg, args: list[str], log: Path):
    argv = [sys.executable, __file__, *args]
    return subprocess.Popen(
        cg.command(argv) if cg else argv, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=ROOT
    )


def finish(procs, what: str, logs: list[Path], timeout: float) -> list[dict]:
    out = []
    for p, log in zip(procs, logs):
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return [{"error": f"{what}: over {timeout:.0f} s"}]
        if p.returncode != 0:
            for q in procs:
                q.kill()
            return [{"error": f"{what}: rc {p.returncode}: " + log.read_text()[-400:].replace("\n", " | ")}]
        out.append(json.loads(stdout.splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--nodes", default="1,2,4")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--work", default="/tmp/tpi-bench-latency")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--skip", default="", help="comma list of contenders to skip: accelerate,plain")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()

    from scripts.bench_memory import machine
    from tests.cgroup_util import MemoryCgroup, drop_page_cache
    from tpi_node.engine.budget import estimate
    from tpi_node.model.config import ModelConfig
    from tpi_node.units import format_size
    from tpi_node.weights.plan import NodeCapacity, make_plan
    from tpi_node.weights.slicer import layer_file, write_node_shards
    from tpi_node.weights.synth import synthesize

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / a.preset
    if not (model / "config.json").is_file():
        synthesize(a.preset, model, layers=a.layers, dtype="fp32")
    cfg = ModelConfig.from_dir(model)
    ctx = a.prompt + a.new_tokens
    one = make_plan(cfg, [NodeCapacity("n0", 0)])
    est = estimate(cfg, one.share_of(0), "fp32", context=ctx, min_kv_tokens=ctx, is_master=True)
    budget = est.total(2)
    print(f"budget for everyone: {format_size(budget)} (1 node, W=2: {est.describe(2)})", flush=True)
    rows, ref_ids = [], None

    for n in [int(x) for x in a.nodes.split(",")]:
        plan = make_plan(cfg, [NodeCapacity(f"n{i}", 0) for i in range(n)])
        plan_file = work / f"plan-{n}.json"
        plan_file.write_text(plan.to_json())
        shards = [work / f"shards-{n}-{r}" for r in range(n)]
        for r in range(n):
            write_node_shards(model, cfg, plan, r, shards[r], "fp32", progress=False)
        layer_files = [s / layer_file(i) for s in shards for i in range(cfg.num_layers)]
        bw = cold_read_bandwidth(layer_files)
        per_token = sum(f.stat().st_size for f in layer_files)
        drop_page_cache()
        init, threads = f"tcp://127.0.0.1:{free_port()}", max(1, 2 // n)
        cgs = [MemoryCgroup(budget, f"tpi-bench-n{r}") for r in range(n)]
        logs = [work / f"tpi-{n}-{r}.log" for r in range(n)]
        try:
            procs = [
                spawn(
                    cgs[r],
                    [
                        "--child-tpi",
                        "--model",
                        str(model),
                        "--plan",
                        str(plan_file),
                        "--rank",
                        str(r),
                        "--world",
                        str(n),
                        "--init",
                        init,
                        "--shards",
                        str(shards[r]),
                        "--window",
                        "2",
                        "--threads",
                        str(threads),
                        "--prompt",
                        str(a.prompt),
                        "--new-tokens",
                        str(a.new_tokens),
                    ],
                    logs[r],
                )
                for r in range(n)
            ]
            res = finish(procs, f"tpi-node {n} nodes", logs, a.timeout)
        finally:
            for cg in cgs:
                cg.remove()
        r0 = res[0]
        if "error" not in r0:
            ref_ids = ref_ids or r0["ids"]
            r0.update(
                disk_bound_s=per_token / bw,
                read_gbs=bw / 1e9,
                streamed_gb=per_token / 1e9,
                stall_per_token=max(x["stall_s"] for x in res) / r0["steps"],
                peak_rss=max(x["peak_rss"] for x in res),
                same_ids=r0["ids"] == ref_ids,
            )
        rows.append((f"tpi-node, {n} node{'s' if n > 1 else ''}, W=2", r0))
        print(rows[-1], flush=True)
        if not a.keep:
            for s in shards:
                shutil.rmtree(s)

    if "accelerate" not in a.skip:
        offload = Path(tempfile.mkdtemp(prefix="offload-", dir=work))
        drop_page_cache()
        with MemoryCgroup(budget, "tpi-bench-acc") as cg:
            log = work / "accelerate.log"
            proc = spawn(
                cg,
                [
                    "--child-hf",
                    "--model",
                    str(model),
                    "--max-memory",
                    str(max(budget - HF_RUNTIME, 64 * MiB)),
                    "--offload",
                    str(offload),
                    "--threads",
                    "2",
                    "--prompt",
                    str(a.prompt),
                    "--new-tokens",
                    str(a.new_tokens),
                ],
                log,
            )
            r = finish([proc], "accelerate", [log], a.timeout)[0]
        shutil.rmtree(offload, ignore_errors=True)
        if "error" not in r:
            r["same_ids"] = r["ids"] == ref_ids
        rows.append(("transformers + accelerate disk offload", r))
        print(rows[-1], flush=True)
    if "plain" not in a.skip:
        log = work / "plain.log"
        proc = spawn(
            None,
            [
                "--child-hf",
                "--model",
                str(model),
                "--threads",
                "2",
                "--prompt",
                str(a.prompt),
                "--new-tokens",
                str(a.new_tokens),
            ],
            log,
        )
        r = finish([proc], "transformers", [log], a.timeout)[0]
        if "error" not in r:
            r["same_ids"] = r["ids"] == ref_ids
        rows.append(("plain transformers (no limit: does not fit the budget)", r))
        print(rows[-1], flush=True)
    if not a.keep:
        shutil.rmtree(model)

    print()
    print(
        f"Latency, synthetic {a.preset} shape ({cfg.num_layers} layers, fp32, "
        f"{(cfg.num_layers * one.share_of(0).layer_params(cfg) * 4) / GiB:.1f} GiB of layers), "
        f"{a.prompt}-token prompt, {a.new_tokens} tokens greedy; memory budget {format_size(budget)} per process "
        f"(a real cgroup each; page cache dropped before each run)"
    )
    print(
        f"command: python scripts/bench_latency.py --preset {a.preset} --layers {a.layers} --nodes {a.nodes} "
        f"--new-tokens {a.new_tokens}"
    )
    print(f"machine: {machine()}; date: {datetime.date.today()}")
    print()
    print(
        "| contender | TTFT | s/token | disk bound (bytes/token / cold read) | stall/token | peak RSS | same tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:150]} | | | | | |")
            continue
        bound = (
            f"{r['disk_bound_s']:.2f} s ({r['streamed_gb']:.2f} GB / {r['read_gbs']:.2f} GB/s)"
            if "disk_bound_s" in r
            else ""
        )
        stall = f"{r['stall_per_token']:.2f} s" if "stall_per_token" in r else ""
        print(
            f"| {name} | {r['ttft_s']:.2f} s | {r['s_per_token']:.2f} s | {bound} | {stall} | "
            f"{r['peak_rss'] / GiB:.2f} GiB | {'yes' if r.get('same_ids') else 'no'} |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--child-tpi", "--child-hf"):
        cp = argparse.ArgumentParser()
        cp.add_argument("--child-tpi", action="store_true")
        cp.add_argument("--child-hf", action="store_true")
        for f in ("--model", "--plan", "--shards", "--init", "--offload", "--max-memory"):
            cp.add_argument(f)
        for f in ("--rank", "--world", "--window", "--threads", "--prompt", "--new-tokens"):
            cp.add_argument(f, type=int, default=0)
        ca = cp.parse_args()
        print(json.dumps(child_tpi(ca) if ca.child_tpi else child_hf(ca)))
    else:
        main()
