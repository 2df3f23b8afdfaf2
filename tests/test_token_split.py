"""The token split over the star: a long step runs as two halves whose allreduces are begun and
waited for apart (StarHub / StarSpoke `allreduce_start` / `allreduce_wait`), so half A's sum is on
the wire while half B computes. Real processes, real gRPC; every node must cut where the master
says and match each sum to its (step, stage)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tpi_node.cluster.link import join_star
from tpi_node.cluster.star_server import StarServer
from tpi_node.commands.compose import build_local_engine, start_master
from tpi_node.engine.batch import BatchLayout
from tpi_node.gpu.split import half_point, split_threshold
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.settings import MasterSettings, token_split

H = 64


def _value(rank: int, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * i + rank)
    return torch.randn(3 + i % 4, H, generator=g)  # every allreduce has its own shape


def _both_in_flight(coll, rank: int, steps: int) -> list[float]:
    """Per step: start A and B, then wait for them (B first on odd steps: A completes on the way);
    a plain allreduce after them. -> the worst error of each sum against the expected one."""
    errors = []
    for step in range(steps):
        coll.begin_step(step)
        i = 3 * step
        a, b = coll.allreduce_start(_value(rank, i)), coll.allreduce_start(_value(rank, i + 1))
        got = {}
        for which, h in ((1, b), (0, a)) if step % 2 else ((0, a), (1, b)):
            got[which] = coll.allreduce_wait(h)
        got[2] = coll.allreduce(_value(rank, i + 2))
        for k, t in got.items():
            want = sum(_value(r, i + k) for r in range(coll.world_size))
            errors.append((t - want).abs().max().item())
    return errors


def _spoke(address: str, rank: int, world: int, steps: int, q) -> None:
    torch.set_num_threads(1)
    try:
        s = join_star(address, rank, world)
        q.put(("ok", rank, max(_both_in_flight(s, rank, steps))))
        time.sleep(0.3)
        s.link.close()
    except Exception as e:
        q.put(("error", rank, f"{type(e).__name__}: {e}"))


def test_two_allreduces_in_flight_are_matched_to_their_keys():
    world, steps = 3, 4
    server = StarServer(world, "127.0.0.1:0")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_spoke, args=(f"127.0.0.1:{server.port}", r, world, steps, q)) for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        server.wait_for_peers()
        assert max(_both_in_flight(server.hub, 0, steps)) < 1e-5
        sums = sum(_value(0, i).numel() * 4 for i in range(3 * steps))  # fp32 bytes of every sum
        assert server.hub.stats.bytes_sent == sums * (world - 1)  # counted once each, whatever the wait order
        results = [q.get(timeout=60) for _ in procs]
        assert all(r[0] == "ok" and r[2] < 1e-5 for r in results), results
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        server.close()


def test_token_split_setting_and_threshold():
    assert [token_split(v) for v in ("auto", "OFF", "64")] == ["auto", "off", 64]
    with pytest.raises(argparse.ArgumentTypeError):
        token_split("0")
    assert [split_threshold(m, 128) for m in ("auto", "off", 64)] == [128, 0, 64]
    assert [half_point(n, 128) for n in (127, 128, 513)] == [0, 64, 256]
    assert half_point(4096, 0) == 0


def test_one_node_forward_cut_through_a_sequence_matches_the_uncut_step(tiny_model_dir):
    """The split loop itself (no network): two sequences, the cut inside the second one, which has
    tokens cached already, so its second half attends to its first half's keys of the same step."""
    engine = build_local_engine(tiny_model_dir("tiny-llama"), progress=False)
    try:
        runner = engine.driver.runner
        prior = BatchLayout((2,), (0,), (9,), ((4, 5),))
        layout = BatchLayout((1, 2), (0, 9), (12, 20), ((0, 1), (4, 5)))
        x = torch.randn(32, runner.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        out = {}
        for cut in (0, 17):
            for t in runner.kv.k + runner.kv.v:  # nothing left by the other run: a read too early differs
                t.fill_(7.0)
            runner.forward(prior, torch.randn(9, runner.cfg.hidden_size, generator=torch.Generator().manual_seed(1)))
            out[cut] = runner.forward(layout, x, cut=cut)
        assert runner.stats.split_steps == 1
        assert (out[17] - out[0]).abs().max().item() < 1e-4
    finally:
        engine.shutdown()


def _worker(port: int, node_id: str, home: Path) -> subprocess.Popen:
    argv = ["join", "--master", f"127.0.0.1:{port}", "--node-id", node_id, "--device", "cpu", "--speed", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "tpi_node.cli", *argv],
        env={**os.environ, "TPI_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=open(home.with_suffix(".log"), "w"),
    )


def test_three_nodes_with_the_split_give_the_unsplit_logits_and_text(smollm2_dir, tmp_path, monkeypatch):
    """SmolLM2 over a master and two `join` processes, --token-split 64: a 300-token prompt's
    prefill runs as two halves of 150 on every node; its logits match the same cluster's unsplit
    step and its greedy text is the unsplit text (no prefix cache, so both runs prefill)."""
    monkeypatch.setenv("TPI_HOME", str(tmp_path / "master"))
    s = MasterSettings(
        model=str(smollm2_dir), dtype="fp32", device="cpu", node_id="master", speed=1.0, token_split=64,
        no_prefix_cache=True,
    )  # fmt: skip
    running = start_master(s, 3, 0)
    workers = [_worker(running.port, f"w{i}", tmp_path / f"w{i}") for i in (1, 2)]
    try:
        deadline = time.monotonic() + 120
        while not running.master.ready():
            assert all(w.poll() is None for w in workers), [p.read_text()[-800:] for p in tmp_path.glob("*.log")]
            assert time.monotonic() < deadline, "cluster not ready"
            time.sleep(0.05)
        engine = running.engine
        hub = running.master.coordinator.deployment.runner.coll
        runner = running.master.coordinator.deployment.runner
        text = "The history of the bicycle begins in the early nineteenth century, when inventors " * 20
        prompt = engine.tokenizer.encode(text)[:300]
        layout, x = BatchLayout.one(0, len(prompt)), engine.head.embed(prompt)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        logits, tokens = {}, {}
        for threshold in (64, 0):
            hub.split_threshold = threshold
            splits = runner.stats.split_steps
            logits[threshold] = engine.head.logits(engine.driver.step(layout, x, engine.driver.kv_epoch())[0])
            engine.driver.free([1])
            tokens[threshold] = [e.token_id for e in engine.generate_sync(prompt, params)]
            assert runner.stats.split_steps - splits == (2 if threshold else 0)  # the prefills, not decode
        assert (logits[64] - logits[0]).abs().max().item() < 1e-3
        assert tokens[64] == tokens[0]
    finally:
        running.stop()
        for w in workers:
            w.kill()
            w.wait()
