"""The cluster end to end: a master in this process (its engine, its gRPC server), workers as
real `tpi-node join` processes over real gRPC on loopback, each with its own shard cache."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpi_node.commands.compose import build_local_engine, start_master
from tpi_node.engine.batch import BatchLayout
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.settings import MasterSettings

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8]


def _worker(port: int, node_id: str, home: Path, log: Path, speed: float = 1.0) -> subprocess.Popen:
    env = {**os.environ, "TPI_HOME": str(home)}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tpi_node.cli",
            "join",
            "--master",
            f"127.0.0.1:{port}",
            "--node-id",
            node_id,
            "--device",
            "cpu",
            "--speed",
            str(speed),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )


@contextlib.contextmanager
def cluster(
    model_dir: Path,
    nodes: int,
    tmp: Path,
    wire: str = "fp32",
    peer_timeout: float = 5.0,
    master_speed: float = 2.0,
    collective: str = "star",
    speculative: str = "auto",
):
    """Speeds fix the plan: the master counts double, so 3 KV heads split 2 + 1 over 2 nodes."""
    s = MasterSettings(
        model=str(model_dir),
        dtype="fp32",
        device="cpu",
        wire=wire,
        peer_timeout=peer_timeout,
        node_id="master",
        speed=master_speed,
        collective=collective,
        speculative=speculative,
    )
    running = start_master(s, nodes, 0)
    master, engine, port = running.master, running.engine, running.port
    workers = [_worker(port, f"w{i}", tmp / f"w{i}", tmp / f"w{i}.log") for i in range(1, nodes)]
    try:
        deadline = time.monotonic() + 120
        while not master.ready():
            assert not [w for w in workers if w.poll() is not None], _logs(tmp)
            assert time.monotonic() < deadline, "cluster not ready: " + _logs(tmp)
            time.sleep(0.05)
        yield master, engine, port, workers
    finally:
        running.stop()
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()


def _logs(tmp: Path) -> str:
    return " | ".join(p.read_text()[-800:] for p in sorted(tmp.glob("w*.log")))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "master"))
    return tmp_path


def _reference(model_dir):
    return build_local_engine(model_dir, dtype="fp32", progress=False)


@pytest.mark.parametrize("preset, nodes", [("tiny-llama", 2), ("tiny-qwen2", 2), ("tiny-qwen2", 3)])
def test_tiny_models_match_the_single_node_engine(tiny_model_dir, home, preset, nodes):
    model = tiny_model_dir(preset)
    ref = _reference(model)
    try:
        layout = BatchLayout.one(0, len(PROMPT))  # blocks 0.. of an idle engine's cache
        x = ref.head.embed(PROMPT)
        want_logits = ref.head.logits(ref.driver.step(layout, x, ref.driver.kv_epoch()))
        ref.driver.free([1])
        want_tokens = [e.token_id for e in ref.generate_sync(PROMPT, GREEDY)]
    finally:
        ref.shutdown()
    with cluster(model, nodes, home) as (master, engine, _, _):
        shares = master.membership.plan.shares
        assert len(shares) == nodes
        if preset == "tiny-qwen2" and nodes == 2:
            assert sorted(s.n_kv for s in shares) == [1, 2], (shares, master.membership.members)  # 3 KV heads / 2
        got_logits = engine.head.logits(engine.driver.step(layout, x, engine.driver.kv_epoch()))
        engine.driver.free([1])
        assert (got_logits - want_logits).abs().max().item() < 1e-3
        got_tokens = [e.token_id for e in engine.generate_sync(PROMPT, GREEDY)]
        assert got_tokens == want_tokens


def test_smollm2_at_three_nodes_matches_the_single_node_engine(smollm2_dir, home):
    ref = _reference(smollm2_dir)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    try:
        want = [e.token_id for e in ref.generate_sync(PROMPT, params)]
        layout = BatchLayout.one(0, len(PROMPT))  # blocks 0.. of an idle engine's cache
        x = ref.head.embed(PROMPT)
        want_logits = ref.head.logits(ref.driver.step(layout, x, ref.driver.kv_epoch()))
    finally:
        ref.shutdown()
    with cluster(smollm2_dir, 3, home) as (master, engine, _, _):
        assert [e.token_id for e in engine.generate_sync(PROMPT, params)] == want
        got_logits = engine.head.logits(engine.driver.step(layout, x, engine.driver.kv_epoch()))
        assert (got_logits - want_logits).abs().max().item() < 1e-3


def test_a_killed_worker_is_replanned_around_and_its_return_transfers_nothing(tiny_model_dir, home):
    """A worker killed mid-generation: the master notices at once, re-plans over the survivors,
    replays the sequence and finishes it with the uninterrupted greedy tokens; the worker that
    comes back is admitted at the next idle moment and, its old plan restored, fetches nothing.
    (When the survivors cannot hold the model the request fails instead: tests/test_fault.py.)"""
    model = tiny_model_dir("tiny-llama")
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    with cluster(model, 3, home) as (master, engine, _, workers):
        m = master.membership
        whole = m.plan
        want = [e.token_id for e in engine.generate_sync(PROMPT, long)]
        events = engine.generate_sync(PROMPT, long)
        got = [next(events).token_id]  # mid-generation ...
        workers[1].send_signal(signal.SIGKILL)  # ... a worker dies
        t0 = time.monotonic()
        got += [e.token_id for e in events]
        assert got == want
        assert time.monotonic() - t0 < 30
        # it was a re-plan over the two survivors, not a lucky retry on the old plan
        assert m.replans == 1 and m.plan.world_size == 2 and m.plan.digest != whole.digest
        assert [x.node_id for x in m.lost] == ["w2"] and "w2" not in {s.node_id for s in m.plan.shares}
        # the same worker comes back with the same node id: readmitted, same plan, nothing fetched
        log = home / "w2-again.log"
        workers.append(_worker(master.bound_port, "w2", home / "w2", log))
        deadline = time.monotonic() + 60
        while "fetched 0 files, 0 bytes" not in log.read_text() or not master.ready():
            assert time.monotonic() < deadline, log.read_text()
            if master.ready():  # (while it re-plans, the cluster is not ready: requests get a 503)
                list(engine.generate_sync(PROMPT, SamplingParams(max_tokens=1)))  # idle points to admit at
            time.sleep(0.2)
        assert [e.token_id for e in engine.generate_sync(PROMPT, long)] == want
        assert m.plan.digest == whole.digest and not m.lost  # the whole cluster's plan again


def test_a_corrupted_shard_file_is_fetched_again(tiny_model_dir, home):
    model = tiny_model_dir("tiny-llama")
    with cluster(model, 2, home) as (master, engine, port, workers):
        first = (home / "w1.log").read_text()
        assert re.search(r"fetched \d+ files, [1-9]\d* bytes", first)
        workers[0].kill()
        workers[0].wait()
        shard = next((home / "w1").rglob("layer-001.safetensors"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        log = home / "w1-again.log"
        workers.append(_worker(port, "w1", home / "w1", log))
        deadline = time.monotonic() + 60
        while not master.ready():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        assert "layer-001.safetensors: corrupt or stale" in text and "fetched 1 files" in text


def test_serve_and_two_join_processes_reach_health_200_with_three_nodes(tiny_model_dir, tmp_path):
    import json
    import urllib.error
    import urllib.request

    from tests.test_star import _free_port_pair

    http, grpc_port = _free_port_pair()
    env = {**os.environ, "TPI_HOME": str(tmp_path / "master"), "TPI_GRPC_PORT": str(grpc_port)}
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"model: {tiny_model_dir('tiny-llama')}\nmin_nodes: 3\ndevice: cpu\nport: 1\n")
    serve = subprocess.Popen(
        [sys.executable, "-m", "tpi_node.cli", "serve", "--config", str(cfg), "--port", str(http)],
        env=env,
        stderr=open(tmp_path / "serve.log", "w"),
    )
    joins = [_worker(grpc_port, f"j{i}", tmp_path / f"j{i}", tmp_path / f"j{i}.log") for i in (1, 2)]
    try:
        deadline, status, body = time.monotonic() + 90, None, {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=2) as r:
                    status, body = r.status, json.loads(r.read())
                    break
            except urllib.error.HTTPError as e:
                status = e.code
                assert status == 503
            except (urllib.error.URLError, ConnectionError):
                pass
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert status == 200, (tmp_path / "serve.log").read_text()
        nodes = body["nodes"]
        assert body["status"] == "ok" and len(nodes) == 3
        assert sorted(n["id"] for n in nodes)[:2] == ["j1", "j2"]
        assert sum(n["kv_heads"][1] - n["kv_heads"][0] for n in nodes) == 2  # tiny-llama: 2 KV heads
    finally:
        for p in joins + [serve]:
            p.terminate()
        for p in joins + [serve]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_gloo_ring_gives_the_star_tokens(tiny_model_dir, home):
    """--collective gloo: the same engine and Session stream, a torch.distributed ring summing."""
    model = tiny_model_dir("tiny-qwen2")
    want = [e.token_id for e in _reference(model).generate_sync(PROMPT, GREEDY)]
    try:
        with cluster(model, 3, home, collective="gloo") as (master, engine, _, workers):
            assert [e.token_id for e in engine.generate_sync(PROMPT, GREEDY)] == want
            assert "gloo ring" in (home / "w1.log").read_text()
            # longer than the heartbeat timeout: the ring's steps count as signs of life
            long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
            t0 = time.monotonic()
            assert len(list(engine.generate_sync(PROMPT, long))) == 400
            assert time.monotonic() - t0 > 3.0, "too short to prove anything about heartbeats"
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # the master's group lives in this test process
            dist.destroy_process_group()


def test_a_stopping_master_tells_its_workers_and_they_exit_0(tiny_model_dir, home):
    """Shutdown carries a code (MASTER_STOPPING): the worker acts on it, not on the reason text."""
    model = tiny_model_dir("tiny-llama")
    with cluster(model, 2, home) as (master, engine, _, workers):
        assert [e.token_id for e in engine.generate_sync(PROMPT, GREEDY)]
        master.stop("the test is over")
        assert workers[0].wait(timeout=20) == 0
    log = (home / "w1.log").read_text()
    assert "the master ended the session: the test is over" in log and "Traceback" not in log


def test_prefix_cache_at_three_nodes_gives_the_single_node_text_without_it(smollm2_dir, home):
    """The master's block tables drive every node's cache: a request whose prefix an earlier,
    different request computed, and one that diverges inside a block, get the greedy tokens of
    a single node without any prefix cache."""
    from tests.test_paged_kv import SYSTEM

    ref = build_local_engine(smollm2_dir, progress=False, prefix_cache=False)
    tok = ref.tokenizer
    first, other = tok.encode(SYSTEM + "What is the capital of France?"), tok.encode(SYSTEM + "Who wrote Hamlet?")
    shared = next(i for i, (a, b) in enumerate(zip(first, other)) if a != b)
    diverge = first[:shared] + tok.encode(" Name the largest ocean.", add_special_tokens=False)
    prompts = [first, other, diverge]
    try:
        want = [[e.token_id for e in ref.generate_sync(p, GREEDY)] for p in prompts]
    finally:
        ref.shutdown()
    with cluster(smollm2_dir, 3, home) as (master, engine, _, _):
        got, hits = [], []
        for p in prompts:
            events = list(engine.generate_sync(p, GREEDY))
            got.append([e.token_id for e in events])
            hits.append(events[0].cached_tokens)
        assert got == want
        block = 16
        assert hits == [0, shared // block * block, shared // block * block]
        assert engine.stats()["kv"]["used"] == 0
