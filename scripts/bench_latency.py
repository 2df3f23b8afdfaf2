"""Token latency and disk reads per token, fp32 vs int8 vs int4 weights, under a memory budget,
through the real gRPC cluster (TPI-LLM Table 3 on this machine, with quantised shards).

    python scripts/bench_latency.py [--preset llama2-7b] [--layers 6] [--nodes 1,2] [--new-tokens 6]
                                    [--formats fp32,int8,int4] [--budgets same,w2] [--baselines accelerate,plain]

What runs, for each N in --nodes and each weight format:
- The checkpoint: a synthetic Llama-2-7B-shaped model (the first --layers of its 32), written by
  `synthesize(..., quant=)` (what `tpi-node synth --quant` runs): fp32 = --quant none, int8 = q8_0
  blocks (34 bytes per 32 weights), int4 = q4_1 blocks (20 bytes per 32); embedding and lm_head
  q8_0 in both. Same seed, so the quantised weights are the fp32 ones quantised. Each is served
  as stored (--quant none: stored blocks stay blocks), so every shard the master slices, every
  FetchShard stream and every window slot holds the format's own bytes.
- The cluster: a master as `tpi-node serve` / `run` start it (commands/compose.py start_master;
  dtype fp32, --speed 1, --speculative off, --no-prefix-cache, --max-context of the test) plus
  N-1 `tpi-node join --master 127.0.0.1:PORT --memory-budget B` processes over loopback; partial
  sums go through the gRPC star allreduce (the default collective, not gloo). The threads of the
  2 cores are shared as `run` shares them (OMP_NUM_THREADS = cores / N).
- Memory: every node process runs in its own real memory cgroup (tests/cgroup_util.py) whose limit
  is the --memory-budget that node is given, so layers beyond the budget come from disk (cgroup v1
  also charges the page cache to the limit). Budgets, per node (the master's includes embedding,
  lm_head and logits; a worker's does not):
    same  every format gets fp32's budget: what that node needs for a window of 2 fp32 layers
          (the issue's "under the same budget"; int8 / int4 may then hold every layer);
    w2    every format gets its own W=2 budget, so every node of every format streams its layers
          through a window of 2 (bytes per token then compare the formats themselves).
  fp32 is the same run in both.
- Per run: the page cache is dropped once the cluster is up; a first request (prefill only) makes
  the cold pass (its TTFT is the table's); then request A (prefill only) and request B (another
  prompt of the same length, 1 + --new-tokens greedy tokens), so that A's prefill and B's meet the
  page cache the cgroups let the nodes keep alike. Every node's counters are read while the engine
  is idle before A, between A and B and after B, each once its prefetcher has filled its window:
  ShardStore counters (bytes_read, stall_s; the master's from engine.stats(), the ones its
  per-request log line differences; a worker sends none to the master, so they are read inside the
  worker: its process is `tpi-node join` run through tpi_node.cli.main with one hook that answers
  snapshot requests from its ShardStore) and the process's disk reads (read_bytes of
  /proc/PID/io: what the block device delivered, page-cache hits excluded, code pages included).
  A decode token's cost = (B - A) / new tokens (B's prefill cancels A's).

Table: s/token (B's decode steps), bytes read per token (ShardStore counters, all nodes), disk
reads per token (all nodes), stall per token (the slowest node), the ratios to fp32 at the same
N, every rank's layer files together (what one pass over all layers reads), and each node's peak
RssAnon (sampled; the memory the kernel cannot reclaim, to set against its budget; VmHWM would
count mapped checkpoint and library pages too).
Issue 13's goals: bytes per token 4x / 8x fewer than fp32 (the formats give 0.27x and
0.16x) and s/token at most 0.3x fp32's under the same budget.

--baselines accelerate,plain adds the earlier contenders on the fp32 checkpoint: transformers +
accelerate disk offload in a cgroup of the fp32 1-node W=2 budget, and plain transformers without
a limit (the compute floor). Big files are deleted as it goes (--keep to keep them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB, MiB = 2**30, 2**20
HF_RUNTIME = 700 * MiB  # python + torch + transformers + accelerate, before weights (measured ~650 MB)
QUANT_OF = {"fp32": "none", "int8": "int8", "int4": "int4"}  # weight format -> synth --quant
COUNTERS = ("bytes_read", "stall_s", "load_s", "disk_read_bytes")  # differenced per token


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    import torch

    return torch.randint(5, 261, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) made the block device read: page-cache hits excluded."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the reader never sees half a file


# ---- a worker: `tpi-node join`, whose counters are answered on request ----------------------------


def child_join(snap: Path, name: str, argv: list[str]) -> int:
    """Run `tpi-node join ARGV` in this process. The worker reports no counters to the master, so
    its ShardStore is remembered here and a thread answers the master child's snapshot requests."""
    import tpi_node.cluster.worker as worker
    from tpi_node.cli import main as cli_main

    stores = []

    class CountedStore(worker.ShardStore):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            stores.append(self)

    worker.ShardStore = CountedStore
    threading.Thread(target=answer_snapshots, args=(snap, name, stores), daemon=True).start()
    return cli_main(argv)


def answer_snapshots(snap: Path, name: str, stores: list) -> None:
    k = 0
    while True:
        if not (snap / f"req-{k}").exists():
            time.sleep(0.01)
            continue
        store = stores[-1] if stores else None
        if store is not None:
            store.settle(60)  # the window is full again: no load is half counted
        stats = store.stats.as_dict() if store is not None else {}
        write_json(snap / f"{name}-{k}.json", {**stats, "disk_read_bytes": disk_read_bytes()})
        k += 1


# ---- the master: start_master as serve / run do, then the two requests ----------------------------


def child_master(a) -> dict:
    from tests.cgroup_util import drop_page_cache
    from tpi_node.commands.compose import start_master
    from tpi_node.settings import MasterSettings

    s = MasterSettings(
        model=a.model,
        dtype="fp32",
        device="cpu",
        node_id="master",
        speed=1.0,
        memory_budget=a.budget,
        max_context=a.ctx,
        no_prefix_cache=True,  # request B must not reuse A's KV cache
        speculative="off",  # one token per step: a step is what s/token measures
        fast_path="off",
        head_split="off",  # the lm_head on the master, as node_budgets counts it (a worker holds none)
    )
    running = start_master(s, a.nodes, a.port)
    workers = [f"w{r}" for r in range(1, a.nodes)]
    try:
        Path(a.ready).write_text(str(running.port))
        wait_cluster(running, a.timeout)
        drop_page_cache()
        # the first pass after the drop is cold (its TTFT is reported); the counted requests come
        # after it, so that A's prefill and B's meet the page cache the cgroup lets a node keep alike
        ttft = timed_request(running.engine, prompt_ids(a.prompt, 1), 1)[1][0]
        snaps = [snapshot(running, Path(a.snap), 0, workers)]
        timed_request(running.engine, prompt_ids(a.prompt, 2), 1)
        snaps.append(snapshot(running, Path(a.snap), 1, workers))
        ids, stamps = timed_request(running.engine, prompt_ids(a.prompt, 3), 1 + a.new_tokens)
        snaps.append(snapshot(running, Path(a.snap), 2, workers))
        files = layer_file_bytes(running)
    finally:
        running.stop()
    return {
        "ids": ids,
        "ttft_s": ttft,
        "s_per_token": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
        "snapshots": {name: [s[name] for s in snaps] for name in ["master", *workers]},
        "layer_file_bytes": files,
    }


def wait_cluster(running, timeout: float) -> None:
    from tpi_node.cluster.membership import ClusterState

    deadline = time.monotonic() + timeout
    while not running.master.ready():
        if running.master.membership.state is ClusterState.FAILED:
            raise RuntimeError(f"cannot form the cluster: {running.master.membership.reason}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster was not ready within {timeout:.0f} s")
        time.sleep(0.1)


def snapshot(running, snap: Path, k: int, workers: list[str]) -> dict[str, dict]:
    """Every node's counters now (the engine is idle), each once its prefetcher is done."""
    running.master.coordinator.deployment.runner.store.settle(60)
    out = {"master": {**running.engine.stats()["nodes"]["master"], "disk_read_bytes": disk_read_bytes()}}
    (snap / f"req-{k}").touch()
    deadline = time.monotonic() + 120
    for w in workers:
        f = snap / f"{w}-{k}.json"
        while not f.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {w} did not answer snapshot {k}")
            time.sleep(0.01)
        out[w] = json.loads(f.read_text())
    return out


def timed_request(engine, ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
    """Greedy `tokens` tokens: (ids, seconds from submission to each token)."""
    from tpi_node.model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    out, stamps, t0 = [], [], time.perf_counter()
    for ev in engine.generate_sync(ids, params):
        if ev.token_id is not None:
            out.append(ev.token_id)
            stamps.append(time.perf_counter() - t0)
    return out, stamps


def layer_file_bytes(running) -> int:
    """Bytes of every rank's layer files (one pass over all layers): the workers' as the master
    sliced them, the master's own as it reads them from the checkpoint in place."""
    from tpi_node.weights.slicer import layer_file

    c = running.master.coordinator
    d = c.deployment
    names = [layer_file(i) for i in range(c.spec.cfg.num_layers)]
    own = d.runner.store.source
    master = sum(own.data_size(n) if own is not None else (d.shard_dir(c.spec, 0) / n).stat().st_size for n in names)
    return master + sum((d.shard_dir(c.spec, r) / n).stat().st_size for r in range(1, d.plan.world_size) for n in names)


# ---- the transformers baselines (--baselines) ----------------------------------------------------


def child_hf(a) -> dict:
    import torch
    import transformers

    from tpi_node.weights.store import peak_rss_bytes

    torch.set_num_threads(a.threads)
    kw = {"torch_dtype": torch.float32}
    if a.max_memory:
        kw.update(device_map="auto", max_memory={"cpu": int(a.max_memory)}, offload_folder=a.offload)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, **kw).eval()
    out, times = [], []
    t0, past, inp = time.perf_counter(), None, torch.tensor([prompt_ids(a.prompt, 2)])
    with torch.no_grad():
        for _ in range(1 + a.new_tokens):
            r = model(inp, past_key_values=past, use_cache=True)
            past = r.past_key_values
            out.append(int(r.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]])
            times.append(time.perf_counter() - t0)
    return {
        "ids": out,
        "ttft_s": times[0],
        "s_per_token": (times[-1] - times[0]) / (len(times) - 1),
        "peak_rss": peak_rss_bytes(),
    }


# ---- parent -------------------------------------------------------------------------------------


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


def node_budgets(cfg, nodes: int, ctx: int, weights) -> list[int]:
    """Per rank, the budget with which it holds a window of exactly 2 layers of `weights`' format
    (engine/budget.py, as the master splits it)."""
    from tpi_node.engine.budget import estimate
    from tpi_node.weights.plan import NodeCapacity, make_plan

    plan = make_plan(cfg, [NodeCapacity(f"n{i}", 0) for i in range(nodes)])  # equal speeds: equal shares
    return [
        estimate(cfg, plan.share_of(r), "fp32", context=ctx, is_master=r == 0, weights=weights).total(2)
        for r in range(nodes)
    ]


def spawn(cg, args: list[str], log: Path, env: dict | None = None, stdout=subprocess.PIPE) -> subprocess.Popen:
    argv = [sys.executable, __file__, *args]
    return subprocess.Popen(
        cg.command(argv) if cg else argv,
        stdout=stdout,
        stderr=open(log, "w"),
        text=True,
        cwd=ROOT,
        env=env,
    )


def tail(log: Path, n: int = 400) -> str:
    return log.read_text(errors="replace")[-n:].replace("\n", " | ") if log.exists() else ""


def wait_ready_file(ready: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the master did not start")
        time.sleep(0.1)


def run_cluster(a, model: Path, nodes: int, budgets: list[int], tag: str) -> dict:
    """One cluster of `nodes` processes, each in a cgroup of its budget; the master child's result
    (or {"error": ...})."""
    from tests.cgroup_util import AnonPeak, MemoryCgroup

    work = Path(a.work)
    snap, ready = work / f"snap-{tag}", work / f"ready-{tag}"
    shutil.rmtree(snap, ignore_errors=True)
    snap.mkdir()
    ready.unlink(missing_ok=True)
    port = free_port()
    env = {**os.environ, "TPI_HOME": str(work / "home"), "OMP_NUM_THREADS": str(max(1, a.cores // nodes))}
    logs = [work / f"{tag}-rank{r}.log" for r in range(nodes)]
    cgs = [MemoryCgroup(b, f"tpi-lat-r{r}") for r, b in enumerate(budgets)]
    procs, peaks = [], []  # peaks: RssAnon (what the kernel cannot reclaim) of each node
    try:
        procs.append(spawn(cgs[0], master_args(a, model, nodes, budgets[0], port, snap, ready), logs[0], env))
        peaks.append(AnonPeak(procs[0].pid).__enter__())
        try:
            wait_ready_file(ready, procs[0], a.timeout)
        except RuntimeError as e:
            return {"error": f"{e}: {tail(logs[0])}"}
        for r in range(1, nodes):
            join = ["join", "--master", f"127.0.0.1:{port}", "--node-id", f"w{r}", "--device", "cpu"]
            join += ["--speed", "1", "--memory-budget", str(budgets[r])]
            procs.append(spawn(cgs[r], ["--child-join", str(snap), f"w{r}", *join], logs[r], env, subprocess.DEVNULL))
            peaks.append(AnonPeak(procs[-1].pid).__enter__())
        res = finish(procs, cgs, logs, a.timeout)
        for pk in peaks:
            pk.__exit__()
        return {**res, "anon_peaks": [pk.peak for pk in peaks]}
    finally:
        for pk in peaks:
            pk.__exit__()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for cg in cgs:
            cg.remove()
        shutil.rmtree(snap, ignore_errors=True)
        ready.unlink(missing_ok=True)


def master_args(a, model: Path, nodes: int, budget: int, port: int, snap: Path, ready: Path) -> list[str]:
    args = ["--child-master", "--model", str(model), "--snap", str(snap), "--ready", str(ready)]
    for flag, v in (("--nodes", nodes), ("--budget", budget), ("--port", port), ("--ctx", a.ctx)):
        args += [flag, str(v)]
    return args + ["--prompt", str(a.prompt), "--new-tokens", str(a.new_tokens), "--timeout", str(a.timeout)]


def finish(procs: list[subprocess.Popen], cgs, logs: list[Path], timeout: float) -> dict:
    """The master child's JSON once every node is gone; an OOM kill in any cgroup is an error."""
    try:
        stdout, _ = procs[0].communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s: {tail(logs[0])}"}
    for p in procs[1:]:  # the master told them to stop
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    killed = [r for r, cg in enumerate(cgs) if cg.oom_kills()]
    if killed:
        return {"error": f"OOM-killed in its cgroup: rank(s) {killed}: " + " / ".join(tail(logs[r]) for r in killed)}
    if procs[0].returncode != 0:
        bad = [r for r, p in enumerate(procs) if p.returncode not in (0, None)]
        return {"error": f"rank(s) {bad} failed: " + " / ".join(tail(logs[r]) for r in bad)}
    return json.loads(stdout.splitlines()[-1])


def summarize(res: dict, new_tokens: int, layers: int) -> dict:
    """Per decode token, from the three snapshots of every node: (after B - before B) - (A)."""
    if "error" in res:
        return res
    per = {}
    for name, (s0, s1, s2) in res.pop("snapshots").items():
        per[name] = {k: ((s2[k] - s1[k]) - (s1[k] - s0[k])) / new_tokens for k in COUNTERS}
        per[name]["window"] = "all" if s2["window"] >= layers else str(s2["window"])
    return {
        **res,
        "bytes": sum(p["bytes_read"] for p in per.values()),
        "disk": sum(p["disk_read_bytes"] for p in per.values()),
        "stall": max(p["stall_s"] for p in per.values()),
        "windows": " / ".join(p["window"] for p in per.values()),
    }


def make_checkpoint(a, fmt: str) -> Path:
    from tpi_node.weights.synth import synthesize

    model = Path(a.work) / f"{a.preset}-{a.layers}-{fmt}"
    if not (model / "config.json").is_file():
        t = time.perf_counter()
        synthesize(a.preset, model, layers=a.layers, dtype="fp32", quant=QUANT_OF[fmt], progress=False)
        print(f"synth {fmt}: {format_gb(dir_bytes(model))} in {time.perf_counter() - t:.0f} s -> {model}", flush=True)
    return model


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def format_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def run_format(a, fmt: str, rows: list, bw: dict) -> None:
    """Every N and budget mode of one weight format; its checkpoint and shards are deleted after."""
    from tpi_node.model.config import ModelConfig
    from tpi_node.weights.sizes import float_bytes, weight_bytes

    model = make_checkpoint(a, fmt)
    cfg = ModelConfig.from_dir(model)
    if fmt == "fp32" and "bw" not in bw:
        bw["bw"] = cold_read_bandwidth(sorted(model.glob("model-*.safetensors")))
    own = weight_bytes(model, "fp32", "none")  # stored blocks count as they are
    for n in a.node_counts:
        for mode in ["same"] if fmt == "fp32" else a.budget_modes:
            budgets = node_budgets(cfg, n, a.ctx, float_bytes("fp32") if mode == "same" else own)
            tag = f"{fmt}-{n}-{mode}"
            print(f"run {tag}: budgets {' / '.join(format_gb(b) for b in budgets)} ...", flush=True)
            t = time.perf_counter()
            r = summarize(run_cluster(a, model, n, budgets, tag), a.new_tokens, cfg.num_layers)
            r.update(fmt=fmt, nodes=n, mode=mode, budgets=budgets, wall_s=time.perf_counter() - t)
            rows.append(r)
            print(f"  {progress_line(r)}", flush=True)
    if not a.keep:
        shutil.rmtree(model)
        shutil.rmtree(Path(a.work) / "home" / "shards", ignore_errors=True)


def progress_line(r: dict) -> str:
    if "error" in r:
        return f"failed ({r['wall_s']:.0f} s): {r['error'][:600]}"
    return (
        f"{r['s_per_token']:.2f} s/token, read {format_gb(r['bytes'])}/token, disk {format_gb(r['disk'])}/token, "
        f"stall {r['stall']:.2f} s/token, windows {r['windows']}, tokens {r['ids']} ({r['wall_s']:.0f} s)"
    )


def run_baselines(a, rows: list) -> None:
    """The transformers contenders on an fp32 checkpoint (synthesized again if it was deleted)."""
    from tests.cgroup_util import MemoryCgroup, drop_page_cache
    from tpi_node.model.config import ModelConfig
    from tpi_node.weights.sizes import float_bytes

    model = make_checkpoint(a, "fp32")
    budget = node_budgets(ModelConfig.from_dir(model), 1, a.ctx, float_bytes("fp32"))[0]
    common = ["--child-hf", "--model", str(model), "--threads", str(a.cores)]
    common += ["--prompt", str(a.prompt), "--new-tokens", str(a.new_tokens)]
    for name in a.baselines:
        log = Path(a.work) / f"{name}.log"
        offload = Path(tempfile.mkdtemp(prefix="offload-", dir=a.work))
        limit = ["--max-memory", str(max(budget - HF_RUNTIME, 64 * MiB)), "--offload", str(offload)]
        drop_page_cache()
        cg = MemoryCgroup(budget, "tpi-lat-hf") if name == "accelerate" else None
        t = time.perf_counter()
        try:
            proc = spawn(cg, common + (limit if cg else []), log)
            r = finish([proc], [cg] if cg else [], [log], a.timeout)
        finally:
            if cg:
                cg.remove()
            shutil.rmtree(offload, ignore_errors=True)
        mode, budgets = ("same", [budget]) if cg else ("none", [])
        r.update(fmt=name, nodes=1, mode=mode, budgets=budgets, wall_s=time.perf_counter() - t)
        rows.append(r)
        print(f"  {name}: {r.get('s_per_token', r.get('error'))}", flush=True)
    if not a.keep:
        shutil.rmtree(model)


MODE_TEXT = {"same": "fp32's W=2", "w2": "own W=2", "none": "no limit"}


def print_table(a, rows: list[dict], bw: float, wall: float) -> None:
    from scripts.bench_memory import machine

    print()
    print(
        f"Decode latency and disk reads per token through the gRPC cluster (star allreduce, loopback), "
        f"synthetic {a.preset} shape ({a.layers} of its layers), {a.prompt}-token prompt, {a.new_tokens} decode "
        f"tokens greedy; every node in a memory cgroup of its --memory-budget, page cache dropped before each run; "
        f"cold read {bw / 1e9:.2f} GB/s"
    )
    print(
        f"command: python scripts/bench_latency.py --preset {a.preset} --layers {a.layers} --nodes {a.nodes} "
        f"--new-tokens {a.new_tokens} --formats {a.formats} --budgets {a.budgets}"
        + (f" --baselines {','.join(a.baselines)}" if a.baselines else "")
    )
    print(f"machine: {machine()}; date: {datetime.date.today()}; wall {wall / 60:.1f} min")
    print()
    print(
        "| nodes | weights | budget per node (master / workers) | window (master / workers) | TTFT | s/token | "
        "x fp32 | read/token (store counters) | x fp32 | disk reads/token | stall/token | layer files | "
        "peak RssAnon (master / workers) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fp32 = {r["nodes"]: r for r in rows if r["fmt"] == "fp32" and "error" not in r}
    for r in rows:
        budget = f"{MODE_TEXT[r['mode']]}: " + " / ".join(f"{b / GiB:.2f}" for b in r["budgets"]) + " GiB"
        head = f"| {r['nodes']} | {r['fmt']} | {budget if r['budgets'] else MODE_TEXT[r['mode']]} |"
        if "error" in r:
            print(f"{head} failed: {r['error'][:200]} | | | | | | | | | |")
            continue
        if "bytes" not in r:  # a transformers baseline: no store counters
            peak = f"{r['peak_rss'] / GiB:.2f} GiB (VmHWM)"
            print(f"{head} | {r['ttft_s']:.2f} s | {r['s_per_token']:.2f} s | | | | | | | {peak} |")
            continue
        base = fp32.get(r["nodes"])
        x_s = f"{r['s_per_token'] / base['s_per_token']:.2f}x" if base else ""
        x_b = f"{r['bytes'] / base['bytes']:.2f}x" if base and base["bytes"] else ""
        print(
            f"{head} {r['windows']} | {r['ttft_s']:.2f} s | {r['s_per_token']:.2f} s | {x_s} | "
            f"{format_gb(r['bytes'])} | {x_b} | {format_gb(r['disk'])} | {r['stall']:.2f} s | "
            f"{format_gb(r['layer_file_bytes'])} | {' / '.join(f'{x / GiB:.2f}' for x in r['anon_peaks'])} GiB |"
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--nodes", default="1,2")
    p.add_argument("--formats", default="fp32,int8,int4")
    p.add_argument("--budgets", default="same,w2", help="same: fp32's W=2 budget for all; w2: each its own")
    p.add_argument("--baselines", default="", help="comma list of transformers contenders: accelerate,plain")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--work", default="/tmp/tpi-bench-latency")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    a.node_counts = [int(x) for x in a.nodes.split(",")]
    a.budget_modes = [m for m in a.budgets.split(",") if m]
    a.baselines = [b for b in a.baselines.split(",") if b]
    a.cores = os.cpu_count() or 1
    # KV cache and attention sized for this test, not the model's 4096 tokens (16-token blocks)
    a.ctx = max(32, -(-(a.prompt + a.new_tokens + 1) // 16) * 16)
    return a


def main() -> None:
    a = parse_args()
    t0 = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TPI_HOME"] = str(work / "home")
    try:  # the quantised-matmul kernel, compiled once here rather than inside a node's cgroup
        from tpi_node.model.qkernel import build

        build()
    except RuntimeError as e:
        print(f"qmatmul kernel not built ({e}): quantised layers dequantise per step", flush=True)
    rows, bw = [], {}
    for fmt in a.formats.split(","):
        run_format(a, fmt, rows, bw)
    if a.baselines:
        run_baselines(a, rows)
    order = list(QUANT_OF)
    rows.sort(key=lambda r: (r["nodes"], r["mode"] == "w2", order.index(r["fmt"]) if r["fmt"] in order else 9))
    if not a.keep:
        shutil.rmtree(work / "home", ignore_errors=True)
    print_table(a, rows, bw.get("bw", 0.0), time.perf_counter() - t0)


def child_main() -> None:
    if sys.argv[1] == "--child-join":
        sys.exit(child_join(Path(sys.argv[2]), sys.argv[3], sys.argv[4:]))
    cp = argparse.ArgumentParser()
    cp.add_argument("--child-master", action="store_true")
    cp.add_argument("--child-hf", action="store_true")
    for f in ("--model", "--snap", "--ready", "--offload", "--max-memory"):
        cp.add_argument(f)
    for f in ("--nodes", "--budget", "--port", "--ctx", "--threads", "--prompt", "--new-tokens"):
        cp.add_argument(f, type=int, default=0)
    cp.add_argument("--timeout", type=float, default=600)
    ca = cp.parse_args()
    print(json.dumps(child_master(ca) if ca.child_master else child_hf(ca)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--child-master", "--child-join", "--child-hf"):
        child_main()
    else:
        main()
