"""The GPU fast path inside the daemon (issue 17), the parts a CPU machine can check.

The composition root (commands/compose.py) chooses from faked detections (the FakeProbe of
test_gpu_cpu.py) and builds the collective it names; the real forward loop (NodeRunner.forward)
then calls the fused add+RMSNorm op through that collective; and the NCCL collective's own code
runs with the gloo backend in two processes (world size 2), including the token split of a long
step, against the one-node result.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from tests.test_gpu_cpu import A100, FakeProbe
from tpi_node.comm.collective import LocalCollective
from tpi_node.comm.nccl import NcclCollective
from tpi_node.commands import compose
from tpi_node.commands.compose import (
    FastPath,
    choose_fast_path,
    local_gpus,
    make_master_collective,
    make_worker_collective,
)
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.runner import open_runner
from tpi_node.gpu import fused
from tpi_node.gpu.detect import detect
from tpi_node.model.config import ModelConfig
from tpi_node.weights.plan import NodeCapacity, make_plan

HOPPER1 = detect(FakeProbe(1))
HOPPER8 = detect(FakeProbe(8))  # NVLink between all pairs, multicast
HOPPER4_NO_MC = detect(FakeProbe(4, multicast=False))


# -- what the composition root chooses ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kind, says",
    [
        (("auto", HOPPER1, "cpu"), "off", "fast path off: this node computes on cpu (add+RMSNorm in torch)"),
        (("auto", HOPPER1, "cuda:0"), "fused", "fused add+RMSNorm Triton kernel in the forward loop (1 node on cuda:0"),
        (("off", HOPPER1, "cuda:0"), "off", "fast path off: --fast-path off"),
        (("auto", detect(FakeProbe(1, triton=False)), "cuda"), "off", "triton not installed"),
        (("auto", detect(FakeProbe(1, gpu=("Tesla V100", (7, 0), 80))), "cuda:0"), "off", "needs sm_80"),
        (("auto", detect(FakeProbe(1, gpu=A100)), "cuda:0"), "fused", "NVIDIA A100"),
        (("auto", HOPPER8, "cuda:0", 4, (0, 1, 2, 3)), "multimem", "one multimem AllReduce+residual+RMSNorm kernel"),
        (("auto", HOPPER4_NO_MC, "cuda:0", 4, (0, 1, 2, 3)), "nccl", "NCCL allreduce over NVLink, then add+RMSNorm in"),
        (("auto", HOPPER8, "cuda:0", 3, ()), "off", "not every node is a GPU of this machine's NVLink domain"),
        (("auto", HOPPER8, "cuda:0", 2, (0, 0)), "off", "not every node is a GPU"),  # two nodes on one GPU
        (("auto", HOPPER8, "cuda:0", 2, (0, 1), "gloo"), "off", "--collective gloo (add+RMSNorm in torch, partial"),
        (("auto", HOPPER8, "cuda:0", 2, (0, 1), "star", True), "off", "a cluster token or TLS"),
        (("auto", detect(FakeProbe(2, gpu=A100)), "cuda:0", 2, (0, 1)), "off", "needs Hopper"),
        (("auto", HOPPER1, "cpu", 3), "off", "on cpu (add+RMSNorm in torch, partial sums over the gRPC star)"),
    ],
)
def test_the_composition_root_chooses_from_detection(args, kind, says):
    fast = choose_fast_path(*args)
    assert fast.kind == kind
    assert says in fast.summary(), fast.summary()


def test_the_line_never_names_a_kernel_that_is_not_in_use():
    # off: no kernel named as running; fused: no NVLink collective named; groups say both.
    for args in [("auto", HOPPER8, "cpu"), ("off", HOPPER8, "cuda:0", 2, (0, 1)), ("auto", HOPPER8, "cuda:0", 2, ())]:
        line = choose_fast_path(*args).summary()
        assert line.startswith("fast path off") and "kernel" not in line and "NCCL" not in line, line
    line = choose_fast_path("auto", HOPPER8, "cuda:0").summary()
    assert "NCCL" not in line and "multimem" not in line and "streams" not in line
    assert "two CUDA streams" in choose_fast_path("auto", HOPPER8, "cuda:0", 8, tuple(range(8))).summary()


def test_local_gpus_give_each_local_node_a_gpu_of_the_nvlink_domain():
    assert local_gpus("auto", "auto", 4, HOPPER8) == (0, 1, 2, 3)
    assert local_gpus("auto", "cuda", 2, HOPPER4_NO_MC) == (0, 1)
    assert local_gpus("auto", "auto", 9, HOPPER8) == ()  # more nodes than GPUs
    assert local_gpus("off", "auto", 4, HOPPER8) == ()
    assert local_gpus("auto", "cuda:3", 2, HOPPER8) == ()  # the user pinned the device
    assert local_gpus("auto", "auto", 2, detect(FakeProbe(2, nvlink=None))) == ()  # NVML cannot tell
    assert local_gpus("auto", "auto", 1, HOPPER8) == ()


def _spec(collective_init: str = "", device: str = "cuda:0"):
    return SimpleNamespace(collective_init=collective_init, device=device, wire="fp32", peer_timeout_s=5.0)


def test_make_master_collective_builds_what_was_chosen():
    one = SimpleNamespace(world_size=1)
    fused_alone = choose_fast_path("auto", HOPPER1, "cuda:0")
    c = make_master_collective(_spec(), fused_alone)(one, None)
    assert isinstance(c, LocalCollective) and c.fused
    assert not make_master_collective(_spec(), choose_fast_path("off", HOPPER1, "cuda:0"))(one, None).fused
    assert not make_master_collective(_spec())(one, None).fused
    # an NVLink group: rank 0 of the NCCL collective, joined lazily (nothing connects here)
    c = make_master_collective(_spec("multimem+tcp://:29555"), fused_alone)(SimpleNamespace(world_size=4), None)
    assert isinstance(c, NcclCollective) and c._init is not None
    assert (c._init.init_method, c._init.rank, c._init.world_size, c._init.backend, c._init.device) == (
        "tcp://127.0.0.1:29555",
        0,
        4,
        "nccl",
        "cuda:0",
    )
    assert c.decision.collective == "multimem" and (c.rank, c.world_size) == (0, 4)


def test_make_worker_collective_joins_the_group_the_master_named():
    a = SimpleNamespace(collective_init="nccl+tcp://:29556", rank=2, world_size=3, wire="fp32")
    c = make_worker_collective(a, None, "10.1.2.3:50051", device="cuda:5")
    assert isinstance(c, NcclCollective) and c.decision.collective == "nccl"
    assert (c._init.init_method, c._init.rank, c._init.device) == ("tcp://10.1.2.3:29556", 2, "cuda:5")


def test_start_master_uses_the_group_for_local_gpus_only(monkeypatch, tiny_model_dir):
    # What start_master puts in the spec: an NVLink group's init only when every node is a
    # local GPU (run / generate --nodes on such a machine); the star otherwise.
    from tpi_node.engine.device import select_device
    from tpi_node.settings import MasterSettings

    seen = {}

    class Stop(Exception):
        pass

    def fake_master(spec, cap, make, **kw):
        seen["init"], seen["device"] = spec.collective_init, spec.device
        raise Stop

    cpu = select_device("cpu")  # a CUDA node as start_master sees it, on this CPU machine
    as_cuda = lambda spec: dataclasses.replace(
        cpu, kind="cuda", capability="sm_90", device=torch.device("cuda", int(spec.partition(":")[2] or 0))
    )
    monkeypatch.setattr(compose, "ClusterMaster", fake_master)
    monkeypatch.setattr(compose, "select_device", as_cuda)
    monkeypatch.setattr(compose, "capacity_for", lambda node, *a: NodeCapacity(node, 1 << 34))
    s = MasterSettings(model=str(tiny_model_dir()))
    for gpus, nodes, prefix in [((2, 3, 5), 3, "multimem+tcp://:"), ((), 3, ""), ((0, 1), 2, "multimem+tcp://:")]:
        with pytest.raises(Stop):
            compose.start_master(s, nodes, 0, gpus, decision=HOPPER8)
        assert seen["init"].startswith(prefix) and bool(seen["init"]) == bool(prefix)
        assert seen["device"] == (f"cuda:{gpus[0]}" if gpus else "cuda:0")  # the master: the first GPU
    for off in (dataclasses.replace(s, fast_path="off"), dataclasses.replace(s, collective="gloo")):
        with pytest.raises(Stop):
            compose.start_master(off, 2, 0, (0, 1), decision=HOPPER8)
        assert not seen["init"].startswith("multimem")


# -- the real forward loop calls the fused op ------------------------------------------------------


@pytest.fixture
def counted_fused(monkeypatch):
    """fused.add_rms_norm, counted (and run: on CPU it computes the reference)."""
    calls = []
    real = fused.add_rms_norm

    def recording(partial, residual, weight, eps):
        calls.append(tuple(residual.shape))
        return real(partial, residual, weight, eps)

    monkeypatch.setattr(fused, "add_rms_norm", recording)
    return calls


def _layout_steps():
    """Step 1: a 6-token prompt; step 2: its first decode token next to two 150-token prompts
    (301 tokens: long enough to split; the cut goes through the second prompt)."""
    tables = ((0,), tuple(range(1, 11)), tuple(range(11, 21)))
    return [BatchLayout((1,), (0,), (6,), tables[:1]), BatchLayout((1, 2, 3), (6, 0, 0), (1, 150, 150), tables)]


def _forward(runner, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for step, layout in enumerate(_layout_steps()):
        x = torch.randn(layout.num_tokens, runner.cfg.hidden_size, generator=g)
        out.append(runner.forward(layout, x, step))
    return out


def test_a_cuda_nodes_forward_loop_runs_the_fused_op(tiny_model_dir, counted_fused):
    model = tiny_model_dir("tiny-llama", layers=3)
    cfg = ModelConfig.from_dir(model)
    plan = make_plan(cfg, [NodeCapacity("n0", 1 << 34)], "fast-path-test")
    alone = choose_fast_path("auto", HOPPER1, "cuda:0")  # what a single H100 node runs
    coll = make_master_collective(_spec(), alone)(plan, None)
    runner = open_runner(model, cfg, plan, 0, coll, "fp32", None, "cpu", False, kv_blocks=32)
    got = _forward(runner)
    assert len(counted_fused) == 2 * cfg.num_layers * 2  # two per layer, two steps
    assert counted_fused[-1] == (301, cfg.hidden_size)
    # and off: the same loop without it, the same numbers (on CPU the fused op is the reference)
    counted_fused.clear()
    off = make_master_collective(_spec(), choose_fast_path("off", HOPPER1, "cuda:0"))(plan, None)
    ref = _forward(open_runner(model, cfg, plan, 0, off, "fp32", None, "cpu", False, kv_blocks=32))
    assert counted_fused == []
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


# -- the NCCL collective's code with the gloo backend, world size 2 --------------------------------

_RANK = textwrap.dedent("""
    import sys, torch
    from tests.test_fast_path import _forward, HOPPER8
    from tpi_node.comm.nccl import GroupInit, NcclCollective
    from tpi_node.engine.runner import open_runner
    from tpi_node.gpu import fused
    from tpi_node.model.config import ModelConfig
    from tpi_node.weights.plan import NodeCapacity, make_plan

    model, rank, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    cfg = ModelConfig.from_dir(model)
    plan = make_plan(cfg, [NodeCapacity("n0", 1 << 34), NodeCapacity("n1", 1 << 34)], "fast-path-test")
    init = GroupInit(f"tcp://127.0.0.1:{port}", rank, 2, backend="gloo", timeout_s=60)
    coll = NcclCollective(HOPPER8, init=init, split_threshold=256)
    calls = []
    real = fused.add_rms_norm
    fused.add_rms_norm = lambda *a: calls.append(a[1].shape[0]) or real(*a)
    runner = open_runner(model, cfg, plan, rank, coll, "fp32", None, "cpu", False, kv_blocks=32)
    assert coll.split_at(6) == 0 and coll.split_at(301) == 128, coll.split_at(301)
    hs = _forward(runner)
    torch.save({"h": hs, "calls": calls, "comm_calls": coll.stats.calls}, out)
    runner.close()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_the_nccl_collective_code_over_gloo_world_2_with_the_token_split(tiny_model_dir, tmp_path):
    model = tiny_model_dir("tiny-llama", layers=3)
    cfg = ModelConfig.from_dir(model)
    one = make_plan(cfg, [NodeCapacity("n0", 1 << 34)], "fast-path-test")
    ref = _forward(open_runner(model, cfg, one, 0, LocalCollective(), "fp32", None, "cpu", False, kv_blocks=32))

    port, root = _free_port(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(model), str(r), str(port), str(tmp_path / f"r{r}.pt")],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    L = cfg.num_layers
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt")
        # step 1 unsplit (6 rows), step 2 split at 128: each half's add+norm is its own call
        assert got["calls"] == [6] * 2 * L + [128, 173] * 2 * L, got["calls"]
        assert got["comm_calls"] == len(got["calls"])
        for a, b in zip(got["h"], ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_split_layout_keeps_every_token_in_order():
    layout = _layout_steps()[1]
    a, b = layout.split(128)
    assert (a.seq_ids, a.past_lens, a.new_lens) == ((1, 2), (6, 0), (1, 127))
    assert (b.seq_ids, b.past_lens, b.new_lens) == ((2, 3), (127, 0), (23, 150))
    assert a.block_tables == layout.block_tables[:2] and b.block_tables == layout.block_tables[1:]
    assert torch.equal(torch.cat([a.positions(), b.positions()]), layout.positions())
    with pytest.raises(ValueError):
        layout.split(301)


def test_fast_path_is_a_setting_of_serve_run_and_generate():
    from tpi_node.cli import parse

    for cmd in ("serve", "run", "generate --prompt hi"):
        _, s, _ = parse([*cmd.split(), "--fast-path", "off"])
        assert s.fast_path == "off"
        assert parse(cmd.split())[1].fast_path == "auto"
    assert isinstance(FastPath("off", "x").summary(), str)


# -- serve --gpus: one node per GPU (what can be checked without GPUs) ----------------------------


def test_parse_gpus(monkeypatch):
    from tpi_node.commands.compose import parse_gpus
    from tpi_node.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parse_gpus(None) == () and parse_gpus("all") == (0, 1, 2, 3) and parse_gpus("2, 0") == (2, 0)
    for bad in ("4", "0,0", "x", ","):
        with pytest.raises(UserError, match="--gpus"):
            parse_gpus(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        parse_gpus("all")


def test_serve_gpus_starts_a_node_per_gpu(monkeypatch):
    from tpi_node.cli import parse
    from tpi_node.commands import serve

    seen = {}
    running = SimpleNamespace(port=50999, master=SimpleNamespace(membership=SimpleNamespace(master_id="box")))
    running.stop = lambda: seen.setdefault("stopped", True)
    monkeypatch.setattr(serve, "parse_gpus", lambda spec: (1, 3, 0) if spec == "1,3,0" else ())
    monkeypatch.setattr(
        serve, "start_master", lambda s, nodes, port, gpus=(): seen.update(start=(nodes, gpus)) or running
    )
    monkeypatch.setattr(serve, "spawn_workers", lambda *a: seen.update(spawn=a) or ["child"])
    monkeypatch.setattr(serve, "stop_children", lambda c: seen.update(stop=c))
    monkeypatch.setattr(serve, "serve_http", lambda s, r: None)
    _, s, _ = parse(["serve", "--gpus", "1,3,0"])
    assert serve.run(s) == 0
    assert seen["start"] == (3, (1, 3, 0))  # the master on GPU 1; three nodes
    address, n, base, *_, devices = seen["spawn"]
    assert (address, n, base, devices) == ("127.0.0.1:50999", 2, "box", ("cuda:3", "cuda:0"))
    assert seen["stop"] == ["child"] and seen["stopped"]
    seen.clear()
    _, s, _ = parse(["serve", "--min-nodes", "2"])
    serve.run(s)
    assert seen["start"] == (2, ()) and "spawn" not in seen
