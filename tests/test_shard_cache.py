"""The shard cache (weights/cache.py): layer files addressable by unit, so a node whose share grew
fetches only the units it gains; slice sets bounded by --cache-size (least recently used first,
never one in use), listed and pruned by `tpi-node cache`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from tpi_node.model.config import ModelConfig
from tpi_node.weights import cache
from tpi_node.weights.plan import NodeShare, PartitionPlan
from tpi_node.weights.slicer import (
    Reuse,
    encode,
    join_parts,
    layer_file,
    read_part,
    shard_dir,
    spans,
    write_node_shards,
    write_tensors,
)

CLI = [sys.executable, "-m", "tpi_node.cli"]


def _plan(cfg: ModelConfig, *shares: tuple[int, int, int, int]) -> PartitionPlan:
    return PartitionPlan(cfg.digest, tuple(NodeShare(f"n{r}", r, *s) for r, s in enumerate(shares)))


# ---- a layer file by unit ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, quant", [("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("bf16", "int4")])
def test_a_grown_share_is_cut_from_the_old_file_and_parts_byte_for_byte(tiny_model_dir, tmp_path, dtype, quant):
    """tiny-qwen2 (q/k/v biases, 3 KV heads, 224 FFN columns): a node that held KV heads 1-2 and
    FFN columns 32-96 and now holds everything gets, from its old file and the two parts around
    it, exactly the file the master slices for its new share (so its sha256 matches)."""
    model = tiny_model_dir("tiny-qwen2")
    cfg = ModelConfig.from_dir(model)
    old = _plan(cfg, (1, 2, 32, 96))
    new = _plan(cfg, (0, cfg.num_kv_heads, 0, cfg.intermediate_size))
    a, b = tmp_path / "old", tmp_path / "new"
    write_node_shards(model, cfg, old, 0, a, dtype, False, quant)
    write_node_shards(model, cfg, new, 0, b, dtype, False, quant)
    r = Reuse.plan(layer_file(0), spans(new.share_of(0)), [(a, *spans(old.share_of(0)))])
    assert r.keep == ((1, 2), (32, 96))
    assert r.before == ((0, 1), (0, 32)) and r.after == ((2, 3), (96, 224))
    for i in range(cfg.num_layers):
        name = layer_file(i)
        parts = [read_part(b / name, cfg, spans(new.share_of(0)), *p) for p in (r.before, r.after)]
        write_tensors(tmp_path / "x", r.assemble(name, cfg, *parts))
        assert (tmp_path / "x").read_bytes() == (b / name).read_bytes(), name


def test_unit_ranges_cut_and_join_back_in_any_split(tiny_model_dir):
    cfg = ModelConfig.from_dir(tiny_model_dir("tiny-qwen2"))
    model = tiny_model_dir("tiny-qwen2")
    whole = Path(model).parent / "whole-set"
    plan = _plan(cfg, (0, cfg.num_kv_heads, 0, cfg.intermediate_size))
    write_node_shards(model, cfg, plan, 0, whole, "fp32", False)
    have = spans(plan.share_of(0))
    full = {k: torch.cat(v) for k, v in read_part(whole / layer_file(1), cfg, have, *have).items()}
    pieces = [
        read_part(whole / layer_file(1), cfg, have, kv, ffn) for kv, ffn in (((0, 1), (0, 7)), ((1, 3), (7, 224)))
    ]
    joined = {k: torch.cat(v) for k, v in join_parts(pieces, cfg).items()}
    assert joined.keys() == full.keys() and all(torch.equal(joined[k], full[k]) for k in full)


def test_files_are_laid_out_as_safetensors_writes_them():
    t = {
        "wqkv": torch.randn(6, 32).bfloat16(),
        "w2": torch.randint(0, 255, (4, 2, 20), dtype=torch.uint8),
        "bqkv": torch.randn(6).bfloat16(),
        "wo": torch.randn(3, 3),
    }
    head, data = encode(t)
    assert b"".join([head, *data]) == save(t)  # old caches stay valid; master and worker agree


# ---- leases and eviction -----------------------------------------------------------------------------
def _fake_set(kv: tuple[int, int], size: int, dtype: str = "fp32") -> Path:
    d = cache.set_dir("f" * 64, dtype, "none", kv, (0, 32))
    d.mkdir(parents=True, exist_ok=True)
    (d / "layer-000.safetensors").write_bytes(b"\0" * size)
    return d


def test_eviction_goes_least_recently_used_first_and_never_takes_a_set_in_use(tmp_path, monkeypatch):
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    sets = []
    for i in range(4):
        sets.append(_fake_set((i, i + 1), 1000))
        cache.hold(sets[-1]).release()  # last used now
        os.utime(cache.lock_path(sets[-1]), (1000 + i, 1000 + i))
    legacy = cache.shards_dir() / ("f" * 12) / ("0" * 16 + "-fp32") / "rank-1-worker"  # the layout before sets
    legacy.mkdir(parents=True)
    (legacy / "layer-000.safetensors").write_bytes(b"\0" * 1000)
    os.utime(legacy, (10, 10))
    lease = cache.hold(sets[0])  # the oldest, but in use
    removed = cache.make_room(limit=3000, need=500)
    assert [s.path for s in removed] == [legacy, sets[1], sets[2]]  # the old layout, then LRU order
    assert sets[0].is_dir() and sets[3].is_dir() and cache.cache_bytes() <= 3000 - 500
    assert not cache.prune(None)[1:]  # --all: only sets[3]; sets[0] stays, in use
    assert sets[0].is_dir() and not sets[3].exists()
    lease.release()
    assert [s.path for s in cache.prune(None)] == [sets[0]] and cache.list_sets() == []


def test_a_killed_process_leaves_no_lease_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    d = _fake_set((0, 1), 10)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tpi_node.weights import cache; cache.hold(sys.argv[1]); "
         "print('held', flush=True); time.sleep(60)", str(d)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        (s,) = cache.list_sets()
        assert s.in_use() and not cache.evict(d)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not s.in_use() and cache.evict(d) and not d.exists()


# ---- the cache in real runs ---------------------------------------------------------------------------
def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _cli(args: list[str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TPI_HOME": str(home), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_runs_at_1_2_and_4_nodes_in_two_dtypes_stay_within_cache_size(tiny_model_dir, tmp_path, monkeypatch):
    """`tpi-node generate` (its master in this process, its workers `tpi-node join` children
    sharing the machine's cache) at 1, 2 and 4 nodes in fp32 and bf16 under --cache-size twice
    the model's size; then `cache list` and `cache prune` in processes of their own."""
    from tpi_node.cli import main

    model = tiny_model_dir("tiny-llama")
    limit = 2 * _tree_bytes(model)
    home = tmp_path / "home"
    monkeypatch.setenv("TPI_HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gen = ["generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu"]
    for dtype in ("fp32", "bf16"):
        for nodes in (1, 2, 4):
            assert main([*gen, "--nodes", str(nodes), "--dtype", dtype, "--cache-size", str(limit)]) == 0
            assert _tree_bytes(home / "shards") <= limit, (dtype, nodes)
    listed = _cli(["cache", "list"], home).stdout
    rows = [line for line in listed.splitlines() if line.startswith(model.name)]
    assert {r.split()[2] for r in rows} == {"fp32", "bf16"} and len(rows) == len(cache_sets(home))
    assert all(r.split()[-1] == "no" for r in rows)  # nothing runs (this process let go of its leases)
    # a bound smaller than what is there: the least recently used sets go first (fp32's, older),
    # passing over the sets this run leases (touched when leased, so they are the newest after it)
    small, before = _tree_bytes(home / "shards") // 2, [x.path for x in cache_sets(home)]
    started = time.time()
    assert main([*gen, "--nodes", "2", "--dtype", "bf16", "--cache-size", str(small)]) == 0
    assert _tree_bytes(home / "shards") <= small
    after = cache_sets(home)
    leased = {x.path for x in after if x.last_used >= started}
    assert leased and all("bf16" in p.parts for p in leased)
    gone = [p for p in before if p not in {x.path for x in after}]
    evictable = [p for p in before if p not in leased]
    assert gone and gone == evictable[: len(gone)]
    assert sorted(before, key=lambda p: "bf16" in p.parts) == before  # fp32's were the older: they went first
    pruned = _cli(["cache", "prune", "--all"], home).stdout
    assert "removed" in pruned and cache_sets(home) == [] and _tree_bytes(home / "shards") == 0


def cache_sets(home: Path) -> list[cache.CachedSet]:
    return cache.list_sets(home / "shards")


def test_a_survivor_fetches_only_the_units_it_gains(tiny_model_dir, tmp_path, monkeypatch):
    """3 nodes, a worker killed: the master re-plans over the two survivors; the surviving worker
    cuts what it kept from its old set and fetches only the lost node's units, fewer bytes than
    its new slice; its set is in use while it serves, and its old one is not."""
    from tests.cluster_procs import Node
    from tpi_node.commands.compose import start_master
    from tpi_node.model.sampling_params import SamplingParams
    from tpi_node.settings import MasterSettings

    model = tiny_model_dir("tiny-llama", layers=2)
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "master"))
    s = MasterSettings(model=str(model), dtype="fp32", device="cpu", node_id="master", speed=1.0, cache_size=10**7)
    running = start_master(s, 3, 0)
    join = ["join", "--master", f"127.0.0.1:{running.port}", "--device", "cpu", "--speed", "1"]
    workers = [Node(f"w{i}", tmp_path, [*join, "--node-id", f"w{i}"]) for i in (1, 2)]
    try:
        master = running.master
        deadline = time.monotonic() + 60
        while not master.ready():
            assert time.monotonic() < deadline and all(w.alive() for w in workers), [w.log() for w in workers]
            time.sleep(0.05)
        plan = master.membership.plan
        rank = {sh.node_id: sh.rank for sh in plan.shares}
        lost, kept = sorted(workers, key=lambda w: rank[w.name], reverse=True)
        before = spans(plan.share_of(rank[kept.name]))
        greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        want = [e.token_id for e in running.engine.generate_sync([5, 17, 42], greedy)]
        lost.kill9()
        assert [e.token_id for e in running.engine.generate_sync([5, 17, 42], greedy)] == want
        share = master.membership.plan.share_of(1)
        assert share.node_id == kept.name and spans(share) != before
        fetches = re.findall(r"shards: fetched (\d+) files, (\d+) bytes", kept.log())
        assert len(fetches) == 2, kept.log()
        new_set = shard_dir(plan.model_digest, master.membership.plan, 1, "fp32")
        new_set = kept.home / new_set.relative_to(tmp_path / "master")
        slice_bytes = sum(f.stat().st_size for f in new_set.glob("*.safetensors"))
        assert 0 < int(fetches[1][1]) < slice_bytes, (fetches, slice_bytes)
        assert "cut from cached units and the parts fetched" in kept.log()
        in_use = {(x.kv, x.ffn): x.in_use() for x in cache_sets(kept.home)}
        assert in_use[spans(share)] and not in_use[before]
    finally:
        running.stop()
        for w in workers:
            w.stop()
