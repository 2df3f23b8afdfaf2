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
import torch
from safetensors import safe_open

from tpi_node.cluster.link import MasterLink
from tpi_node.cluster.sessions import HEARTBEAT_TIMEOUT_S
from tpi_node.commands.compose import build_local_engine, start_master
from tpi_node.engine.batch import BatchLayout
from tpi_node.model import qkernel
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.settings import MasterSettings

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8]


def _worker(port: int, node_id: str, home: Path, log: Path, speed: float = 1.0, extra=()) -> subprocess.Popen:
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
            *extra,
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
    quant: str = "none",
    head_split: str = "auto",
    worker_flags: dict[int, list[str]] | None = None,
    **settings,
):
    """Speeds fix the plan: the master counts double, so 3 KV heads split 2 + 1 over 2 nodes.
    `worker_flags`: more `join` flags for worker i."""
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
        quant=quant,
        head_split=head_split,
        **settings,
    )
    running = start_master(s, nodes, 0)
    master, engine, port = running.master, running.engine, running.port
    flags = worker_flags or {}
    workers = [
        _worker(port, f"w{i}", tmp / f"w{i}", tmp / f"w{i}.log", extra=flags.get(i, ())) for i in range(1, nodes)
    ]
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
    """Workers dial the master over loopback: their sessions run on its Unix socket, except at 3
    nodes, where w2 keeps gRPC (--local-session off): the hub sums over both at once."""
    model = tiny_model_dir(preset)
    ref = _reference(model)
    try:
        layout = BatchLayout.one(0, len(PROMPT))  # blocks 0.. of an idle engine's cache
        x = ref.head.embed(PROMPT)
        want_logits = ref.head.logits(ref.driver.step(layout, x, ref.driver.kv_epoch())[0])
        ref.driver.free([1])
        want_tokens = [e.token_id for e in ref.generate_sync(PROMPT, GREEDY)]
    finally:
        ref.shutdown()
    flags = {2: ["--local-session", "off"]}
    with cluster(model, nodes, home, worker_flags=flags) as (master, engine, _, _):
        shares = master.membership.plan.shares
        assert len(shares) == nodes
        if preset == "tiny-qwen2" and nodes == 2:
            assert sorted(s.n_kv for s in shares) == [1, 2], (shares, master.membership.members)  # 3 KV heads / 2
        got_logits = engine.head.logits(engine.driver.step(layout, x, engine.driver.kv_epoch())[0])
        engine.driver.free([1])
        assert (got_logits - want_logits).abs().max().item() < 1e-3
        got_tokens = [e.token_id for e in engine.generate_sync(PROMPT, GREEDY)]
        assert got_tokens == want_tokens
        if nodes == 2:
            _a_session_without_its_ticket_is_refused_on_the_unix_socket(master)
    assert (
        "session on a Unix socket (same machine), small partial sums on a shared-memory lane"
        in (home / "w1.log").read_text()
    )
    if nodes == 3:
        assert "session on gRPC" in (home / "w2.log").read_text()


def _a_session_without_its_ticket_is_refused_on_the_unix_socket(master) -> None:
    """The socket takes the same Hello as gRPC: rank, plan and node id right, the ticket wrong."""
    plan = master.membership.plan
    hello = pb.Hello(node_id=plan.share_of(1).node_id, plan_digest=plan.digest, rank=1, ticket=b"guess")
    link = MasterLink(f"127.0.0.1:{master.bound_port}")
    try:
        assert link.open_session(hello, master.unix.path).startswith("a Unix socket (same machine)")
        reply = link.run(link.recv(10.0))
        assert reply.shutdown.code == pb.REJOIN and "did not show the ticket of its join" in reply.shutdown.reason
    finally:
        link.close()


def test_smollm2_at_three_nodes_matches_the_single_node_engine_and_transformers(smollm2_dir, smollm2_hf, home):
    """Served from its Q4_1 blocks, sliced over 3 nodes (column cuts of o_proj / down_proj at block
    boundaries): the single node's logits, and transformers' 32 greedy tokens on the chat prompt."""
    ref = _reference(smollm2_dir)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    try:
        want = [e.token_id for e in ref.generate_sync(PROMPT, params)]
        layout = BatchLayout.one(0, len(PROMPT))  # blocks 0.. of an idle engine's cache
        x = ref.head.embed(PROMPT)
        want_logits = ref.head.logits(ref.driver.step(layout, x, ref.driver.kv_epoch())[0])
        chat = ref.tokenizer.encode(
            ref.tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a robot."}]),
            add_special_tokens=False,
        )
    finally:
        ref.shutdown()
    with torch.no_grad():
        hf_chat = smollm2_hf.generate(torch.tensor([chat]), max_new_tokens=32, do_sample=False)[0, len(chat) :].tolist()
    with cluster(smollm2_dir, 3, home) as (master, engine, _, _):
        # every node's decode steps run as one C call, asking the collective for each half's sum
        assert master.coordinator.deployment.runner.stack is not None
        for w in ("w1", "w2"):
            assert (
                "every layer in one C call (each half layer's sum asked of the collective"
                in (home / f"{w}.log").read_text()
            )
        greedy32 = SamplingParams(max_tokens=32, temperature=0.0)
        assert [e.token_id for e in engine.generate_sync(chat, greedy32)][: len(hf_chat)] == hf_chat
        assert [e.token_id for e in engine.generate_sync(PROMPT, params)] == want
        got_logits = engine.head.logits(engine.driver.step(layout, x, engine.driver.kv_epoch())[0])
        assert (got_logits - want_logits).abs().max().item() < 1e-3


def test_int4_shards_travel_quantised_to_the_workers_and_give_the_single_node_text(tiny_model_dir, home):
    """--quant int4 on a float checkpoint: every worker's shard files hold q4_1 blocks (FetchShard
    streams the quantised bytes), and the cluster's greedy text is the single node's."""
    model = tiny_model_dir("tiny-qwen2")
    ref = build_local_engine(model, progress=False, quant="int4")
    try:
        want = [e.token_id for e in ref.generate_sync(PROMPT, GREEDY)]
    finally:
        ref.shutdown()
    with cluster(model, 3, home, quant="int4") as (master, engine, _, _):
        assert [e.token_id for e in engine.generate_sync(PROMPT, GREEDY)] == want
        layer_files = sorted((home / "w1").rglob("layer-000.safetensors"))
        assert layer_files, list((home / "w1").rglob("*"))
        with safe_open(layer_files[0], "pt") as f:
            kinds = {k: (f.get_slice(k).get_dtype(), len(f.get_slice(k).get_shape())) for k in f.keys()}
        assert ("U8", 3) in kinds.values(), kinds  # blocks [N, K/32, 20], not floats


def _decode_logits(engine, prompt: list[int]) -> torch.Tensor:
    """The logits of one decode step after the prompt (a one-token step: the kernel's own path)."""
    d = engine.driver
    h = d.step(BatchLayout.one(0, len(prompt)), engine.head.embed(prompt), d.kv_epoch())[0]
    nxt = int(engine.head.logits(h)[-1].argmax())
    h = d.step(BatchLayout.one(len(prompt), 1), engine.head.embed([nxt]), d.kv_epoch())[0]
    d.free([1])
    return engine.head.logits(h)[-1]


def test_act_quant_int8_reaches_every_worker_and_decodes_as_one_node_does(tiny_model_dir, home):
    """--act-quant int8 on the master: every worker takes it from its assignment (its log says
    which kernel runs), and a decode step's logits are the single node's up to the int8 rounding
    of sums added in another order (a value on a rounding edge may flip one quantum): within 2%
    of their range. Greedy text is not compared: a near-tie of the tiny random model flips. A
    one-token prompt: every step takes the kernel on every node, whatever step size `tune` chose
    for each (a prefill chunk past it would run exact dequantise + GEMM on one node, int8 on another)."""
    model, prompt = tiny_model_dir("tiny-qwen2"), PROMPT[:1]
    ref = build_local_engine(model, progress=False, quant="int4", act_quant="int8")
    try:
        want = _decode_logits(ref, prompt)
    finally:
        ref.shutdown()
    with cluster(model, 2, home, quant="int4", act_quant="int8") as (master, engine, _, _):
        got = _decode_logits(engine, prompt)
        vnni = qkernel.TUNING.int8_activations  # this machine's kernel has it (else the exact one runs)
        says = "int8 activations (VNNI)" if vnni else "--act-quant int8 needs AVX512-VNNI"
        assert says in (home / "w1.log").read_text(), _logs(home)
    spread = float(want.max() - want.min())
    print(f"act-quant int8, 2 nodes against 1: logits max diff {(got - want).abs().max():.4f} of {spread:.2f}")
    assert (got - want).abs().max() < 0.02 * spread


def test_int8_wire_at_three_nodes_stays_close_to_the_fp32_wire(smollm2_dir, home):
    """--wire int8 (Q8_0 blocks of the partial sums both ways, summed in fp32 at the master) at 3
    nodes on SmolLM2: 3.8x fewer bytes per allreduce; the first step's logits within 2 of the fp32
    wire's (measured: 1.3 at most over the 49,152 logits) with the same argmax, and the same greedy
    text for its first tokens (measured: the first 10 of 32 on this prompt; docs/quant.md)."""
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    texts, sent, logits = {}, {}, {}
    for wire in ("fp32", "int8"):
        (home / wire).mkdir()
        with cluster(smollm2_dir, 3, home / wire, wire=wire) as (master, engine, _, _):
            tok = engine.tokenizer
            chat = tok.encode(
                tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot."}]),
                add_special_tokens=False,
            )
            layout = BatchLayout.one(0, len(chat))
            h = engine.driver.step(layout, engine.head.embed(chat), engine.driver.kv_epoch())[0]
            logits[wire] = engine.head.logits(h)[-1]
            engine.driver.free([1])
            coll = master.coordinator.deployment.runner.coll
            before = coll.stats.bytes_sent
            texts[wire] = [e.token_id for e in engine.generate_sync(chat, params)]
            sent[wire] = coll.stats.bytes_sent - before
    same = next((i for i, (a, b) in enumerate(zip(texts["int8"], texts["fp32"])) if a != b), len(texts["fp32"]))
    print(f"int8 wire: logits max diff {(logits['int8'] - logits['fp32']).abs().max():.3f}, {same} tokens equal")
    assert sent["int8"] < 0.3 * sent["fp32"], sent
    assert (logits["int8"] - logits["fp32"]).abs().max() < 2.0
    assert logits["int8"].argmax() == logits["fp32"].argmax()
    assert texts["int8"][:8] == texts["fp32"][:8], texts


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
            # steps back to back for twice the heartbeat timeout (however fast this machine is):
            # the workers send no heartbeat while in steps, and nobody is dropped for it
            long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
            t0, tokens = time.monotonic(), 0
            while time.monotonic() - t0 < 2 * HEARTBEAT_TIMEOUT_S:
                got = len(list(engine.generate_sync(PROMPT, long)))
                assert got == 400, got
                tokens += got
            assert master.ready() and master.membership.replans == 0 and not master.membership.lost
            print(f"\n{tokens} tokens over gloo in {time.monotonic() - t0:.1f} s, no worker dropped")
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
