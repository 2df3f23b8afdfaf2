"""The budget holds under load: a real `tpi-node serve` in a memory cgroup whose limit is its
--memory-budget plus a stated margin serves 16 concurrent requests of 1,000-token prompts and 200
new tokens each. The budget leaves KV blocks for a few of them at a time: the rest wait in the
queue or are preempted and recomputed, and every one completes; the process is never killed and
its anonymous memory (sampled all through the load) stays within the budget itself. The control:
the same load on a server whose KV cache ignores the budget (--kv-blocks for all 16 at once) in
the same cgroup is OOM-killed.

The model: 4 llama layers of hidden 256 with 4 heads and 4 KV heads of 256 dimensions (32 KiB of
fp32 KV per token, ~20 MB of weights), so the KV cache is what the load grows: 16 x 1,200 tokens
need ~600 MB of it, while its matmuls cost a fifth of a hidden-1024 model's of the same KV.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import pytest

from tests.cgroup_util import AnonPeak, CgroupUnavailable, MemoryCgroup, peak_text
from tests.cluster_procs import Node, free_port, wait_health
from tpi_node.engine.budget import estimate
from tpi_node.engine.limits import BLOCK_TOKENS
from tpi_node.model import presets
from tpi_node.model.config import ModelConfig
from tpi_node.units import format_size
from tpi_node.weights.plan import NodeCapacity, make_plan
from tpi_node.weights.synth import synthesize

try:
    import httpx
except ImportError:  # newer openai releases ship httpx as httpx2
    import httpx2 as httpx

KV_HEAVY = {**presets._llama(256, 256, 4, 4, 4, 261, max_pos=2048), "head_dim": 256}
REQUESTS, PROMPT_TOKENS, NEW_TOKENS = 16, 1000, 200
KV_FOR_A_FEW = 6 * (PROMPT_TOKENS + NEW_TOKENS)  # the budget's KV: about 6 sequences at once
MARGIN = 96 * 2**20  # the cgroup's room beyond the budget: allocator slack, page cache of the shards


def _load(url: str, model: str) -> list[tuple[int, str]]:
    def one(i: int):
        prompt = [(7 * i + 3 * t) % 250 + 5 for t in range(PROMPT_TOKENS)]  # distinct prompts: no prefix hits
        body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=600, json=body)
        except httpx.HTTPError as e:  # the server was killed under this load
            return 0, f"{type(e).__name__}: {e}"
        if r.status_code != 200:
            return r.status_code, r.text[:200]
        body = r.json()
        return body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]

    with cf.ThreadPoolExecutor(REQUESTS) as pool:
        return list(pool.map(one, range(REQUESTS)))


def _peak_rss(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def test_16_long_requests_stay_within_the_budget_and_the_same_load_without_it_is_killed(tmp_path):
    presets.PRESETS["kv-heavy"] = KV_HEAVY
    try:
        model = synthesize("kv-heavy", tmp_path / "model", progress=False)
    finally:
        presets.PRESETS.pop("kv-heavy", None)
    cfg = ModelConfig.from_dir(model)
    share = make_plan(cfg, [NodeCapacity("m", 0, 1)]).share_of(0)
    est = estimate(cfg, share, "fp32", is_master=True)
    budget = est.total(None, -(-KV_FOR_A_FEW // BLOCK_TOKENS))  # resident weights + KV for ~6 sequences
    need_all = est.total(None, -(-REQUESTS * (PROMPT_TOKENS + NEW_TOKENS) // BLOCK_TOKENS))
    limit = budget + MARGIN
    assert need_all > limit + 256 * 2**20, "the load must not fit the limit without the budget"
    try:
        cg = MemoryCgroup(limit, "tpi-load-test")
    except CgroupUnavailable as e:
        pytest.skip(str(e))
    http, grpc_port = free_port(), free_port()
    argv = ["serve", "--model", str(model), "--device", "cpu", "--port", str(http), "--grpc-port", str(grpc_port)]
    url = f"http://127.0.0.1:{http}"
    with cg:
        node = Node("budgeted", tmp_path, argv + ["--memory-budget", str(budget)], wrap=cg.command([]))
        try:
            wait_health(url, 1, 120, [node])
            t0 = time.perf_counter()
            with AnonPeak(node.proc.pid) as anon:
                results = _load(url, model.name)
            took = time.perf_counter() - t0
            assert results == [(NEW_TOKENS, "length")] * REQUESTS, results
            stats = httpx.get(f"{url}/cluster.json").json()
            assert node.alive() and cg.oom_kills() == 0
            peak_rss, peak_cg = _peak_rss(node.proc.pid), cg.peak_bytes()
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            node.stop()
        # The cgroup cannot exceed its limit (the kernel reclaims page cache, or kills): what
        # counts is that it never had to kill, and that the memory it cannot reclaim stayed
        # within the budget. VmHWM also counts shared libraries' file pages, so it is only shown.
        assert anon.samples > 10 and 0 < anon.peak <= budget, (format_size(anon.peak), format_size(budget))
        waited = float(next(ln.split()[1] for ln in metrics.splitlines() if ln.startswith("tpi_kv_preemptions_total")))
        print(
            f"\nbudget {format_size(budget)} + margin {format_size(MARGIN)} = limit {format_size(limit)} "
            f"(the whole load needs {format_size(need_all)}): {REQUESTS} x {PROMPT_TOKENS}+{NEW_TOKENS} tokens "
            f"in {took:.1f} s, peak anon {format_size(anon.peak)}, peak rss {peak_text(peak_rss)} "
            f"(file pages included), cgroup peak {peak_text(peak_cg)}, "
            f"{waited:.0f} preemptions; throughput {stats['throughput']['completion_tokens']} tokens"
        )

        # Control: the KV cache sized for every request at once, the budget ignored.
        cg.reset_peak()
        blocks = -(-REQUESTS * (PROMPT_TOKENS + NEW_TOKENS) // BLOCK_TOKENS)
        control = Node("unbudgeted", tmp_path, argv + ["--kv-blocks", str(blocks)], wrap=cg.command([]))
        try:
            wait_health(url, 1, 120, [control])
            results = _load(url, model.name)
            deadline = time.monotonic() + 30
            while control.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not control.alive() and cg.oom_kills() >= 1, (results[:3], control.log()[-1500:])
        finally:
            control.stop()
        print(f"control with --kv-blocks {blocks} (budget ignored): OOM-killed ({cg.oom_kills()} kill(s))")
