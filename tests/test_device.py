"""Devices (issue 9): choosing where a node computes, its dtype and measured speed, the device hop
of partials, and the whole flow of scripts/device_check.py run here on the CPU.

The CUDA tests at the bottom run only where a CUDA device exists (the device check runs this file
there too); on a machine without one they are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tpi_node.comm.device_hop import DeviceHop, InProcessGroup
from tpi_node.engine.device import DeviceInfo, default_dtype, device_capacity, measure_speed, select_device
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.weights.plan import NodeCapacity, make_plan

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


def fake_cuda(capability: str) -> DeviceInfo:
    return DeviceInfo("Some GPU", "cuda", 8 << 30, capability, torch.device("cuda", 0), False)


# ---- choosing the device ----------------------------------------------------------------------
def test_auto_picks_cuda_then_mps_then_cpu():
    info = select_device("auto")
    mps = torch.backends.mps.is_available()
    assert info.kind == ("cuda" if HAS_CUDA else "mps" if mps else "cpu")
    assert select_device(None).kind == info.kind


def test_cpu_device_describes_this_machine():
    info = select_device("CPU")
    assert info.kind == "cpu" and info.device == torch.device("cpu")
    assert info.memory_bytes == psutil.virtual_memory().total
    assert info.capability is None and info.shared_memory
    assert "cpu" in info.summary() and "GiB" in info.summary()
    assert info.as_dict()["device"] == "cpu"


@pytest.mark.parametrize("spec", ["gpu", "cpu:1", "cuda:x", "mps:0", "cuda:-1", "tpu"])
def test_unknown_device_is_one_clear_line(spec):
    with pytest.raises(UserError, match=r"unknown device .*use auto, cpu, cuda, cuda:N or mps") as e:
        select_device(spec)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_says_so(spec):
    with pytest.raises(UserError, match=r"not available here .*use --device auto or cpu"):
        select_device(spec)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps_says_so():
    with pytest.raises(UserError, match=r"'mps' is not available here"):
        select_device("mps")


@needs_cuda
def test_cuda_index_out_of_range():
    n = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"has {n} CUDA device"):
        select_device(f"cuda:{n}")


def test_device_flag_parses_and_reads_the_environment():
    from tpi_node.settings import JoinSettings, load

    assert select_device(load(JoinSettings, {"device": "cpu"}, {}).device).kind == "cpu"
    assert load(JoinSettings, {}, {}).device == "auto"
    assert load(JoinSettings, {}, {"TPI_DEVICE": "cpu"}).device == "cpu"
    with pytest.raises(UserError):
        select_device(load(JoinSettings, {"device": "quantum"}, {}).device)


def test_the_cli_turns_a_bad_device_into_one_line():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpi_node.cli",
            "generate",
            "--prompt",
            "hi",
            "--device",
            "cuda:7" if not HAS_CUDA else "nope",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "device" in r.stderr and r.stdout == ""


# ---- dtype per device ---------------------------------------------------------------------------
def test_dtype_defaults_follow_the_device():
    assert default_dtype(select_device("cpu")) == "fp32"
    assert default_dtype(fake_cuda("sm_90")) == "bf16"
    assert default_dtype(fake_cuda("sm_87")) == "bf16"  # Jetson Orin
    assert default_dtype(fake_cuda("sm_75")) == "fp16"  # Turing laptop card: no bf16
    assert default_dtype(fake_cuda("sm_53")) == "fp16"  # Jetson Nano
    assert default_dtype(DeviceInfo("Apple MPS", "mps", 1 << 34, None, torch.device("cpu"))) == "bf16"


def test_dtype_asked_is_checked_against_the_device():
    cpu = select_device("cpu")
    assert default_dtype(cpu, "bf16") == "bf16" and default_dtype(cpu, "fp32") == "fp32"
    with pytest.raises(UserError, match="fp16 is not supported on cpu"):
        default_dtype(cpu, "fp16")
    with pytest.raises(UserError, match="no bf16 arithmetic"):
        default_dtype(fake_cuda("sm_75"), "bf16")
    assert default_dtype(fake_cuda("sm_75"), "fp16") == "fp16"
    with pytest.raises(UserError, match="unknown dtype"):
        default_dtype(cpu, "int3")


# ---- measured speed and the plan ------------------------------------------------------------------
def test_speed_is_measured_quickly_and_feeds_the_plan(tiny_model_dir):
    import time

    t0 = time.perf_counter()
    s = measure_speed.__wrapped__("cpu", "fp32", 0.05)
    assert s > 0.01 and time.perf_counter() - t0 < 2.0
    cap = device_capacity("me", select_device("cpu"), memory_budget=1 << 30, speed=s)
    assert cap.speed == s and cap.memory_bytes == 1 << 30 and cap.cores >= 1
    assert (
        device_capacity("me", select_device("cpu"), memory_budget=1 << 60, speed=1.0).memory_bytes
        <= psutil.virtual_memory().total
    )  # never more than the device has

    cfg = ModelConfig.from_dir(tiny_model_dir("tiny-llama"))
    fast, slow = NodeCapacity("gpu", 1 << 40, 1, speed=40.0), NodeCapacity("cpu", 1 << 40, 8, speed=10.0)
    gpu, cpu = make_plan(cfg, [fast, slow]).shares
    assert gpu.layer_params(cfg) > 2 * cpu.layer_params(cfg)
    assert gpu.n_kv >= cpu.n_kv and gpu.n_ffn > cpu.n_ffn
    # Without a speed for every node the cores decide (the cpu node has more here).
    gpu2, cpu2 = make_plan(cfg, [NodeCapacity("gpu", 1 << 40, 1), slow]).shares
    assert cpu2.layer_params(cfg) > gpu2.layer_params(cfg)


# ---- the device hop and the in-process group --------------------------------------------------------
def _run_ranks(fns):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(fn) for fn in fns]]


def test_in_process_group_sums_in_rank_order_every_round():
    g = InProcessGroup(3)
    members = [g.member(r) for r in range(3)]
    gen = torch.Generator().manual_seed(1)
    rounds = [[torch.randn(4, 8, generator=gen) for _ in range(3)] for _ in range(5)]

    def rank(r):
        return [members[r].allreduce(rounds[k][r]) for k in range(5)]

    out = _run_ranks([lambda r=r: rank(r) for r in range(3)])
    for k in range(5):
        want = (rounds[k][0] + rounds[k][1]) + rounds[k][2]
        for r in range(3):
            assert torch.equal(out[r][k], want)


def test_device_hop_converts_to_the_wire_dtype_and_back():
    g = InProcessGroup(2)
    hop = [DeviceHop(g.member(r), wire_dtype=torch.float32) for r in range(2)]
    a = torch.randn(3, 16).to(torch.bfloat16)  # a bf16 node
    b = torch.randn(3, 16)  # an fp32 node
    ra, rb = _run_ranks([lambda: hop[0].allreduce(a), lambda: hop[1].allreduce(b)])
    want = a.float() + b
    assert ra.dtype == torch.bfloat16 and rb.dtype == torch.float32
    assert torch.equal(rb, want) and torch.equal(ra, want.to(torch.bfloat16))
    assert hop[0].world_size == 2 and hop[1].rank == 1


def test_in_process_group_refuses_device_tensors_without_the_hop():
    g = InProcessGroup(1)
    t = torch.empty(2, 2, device="meta")
    with pytest.raises(ValueError, match="wrap it in DeviceHop"):
        g.member(0).allreduce(t)


# ---- attention kernels on CUDA (process-wide flags; settable without a GPU) -----------------------------
def test_cuda_attention_setting_turns_cudnn_off_by_default(monkeypatch):
    from tpi_node.engine.device import SDPA_ENV, set_cuda_attention

    b = torch.backends.cuda
    before = (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())
    try:
        monkeypatch.delenv(SDPA_ENV, raising=False)
        assert set_cuda_attention() == "no-cudnn"
        assert not b.cudnn_sdp_enabled() and b.mem_efficient_sdp_enabled() and b.math_sdp_enabled()
        monkeypatch.setenv(SDPA_ENV, "math")
        assert set_cuda_attention() == "math"
        assert b.math_sdp_enabled() and not (b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled())
        monkeypatch.setenv(SDPA_ENV, "fastest")
        with pytest.raises(UserError, match="unknown TPI_CUDA_SDPA 'fastest'"):
            set_cuda_attention()
    finally:
        b.enable_cudnn_sdp(before[0])
        b.enable_flash_sdp(before[1])
        b.enable_mem_efficient_sdp(before[2])
        b.enable_math_sdp(before[3])


# ---- nothing CUDA-only is imported on a CPU machine ---------------------------------------------------
def test_choosing_a_device_imports_no_cuda_only_code():
    # (torch itself may import pynvml when it is installed: only what our code adds counts)
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "from tpi_node.engine.device import select_device, default_dtype, measure_speed\n"
        "import tpi_node.comm.device_hop, tpi_node.weights.store\n"
        "i = select_device('auto'); default_dtype(i); measure_speed('cpu')\n"
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('triton', 'pynvml', 'cupy')\n"
        "             or m.startswith('tpi_node.gpu'))\n"
        "print(i.kind, bad, torch.cuda.is_initialized())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    kind, rest = r.stdout.split(" ", 1)
    if kind == "cpu":
        assert rest.strip() == "[] False"


# ---- the device check script, run here on the CPU (the flow the GPU run follows) ----------------------
def test_device_check_script_runs_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    # keep what PYTHONPATH had (on the GPU machine: the carried grpcio / protobuf wheels)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run(
        [
            sys.executable,
            "scripts/device_check.py",
            "--device",
            "cpu",
            "--models",
            "tiny",
            "--tokens",
            "8",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    res = json.loads(out.read_text())
    runs = res["models"]["tiny"]["runs"]
    # real `tpi-node join` processes over gRPC: even splits, and the measured-speed split
    assert res["ok"] and runs["grpc:cpu+cpu-even"]["equal_to_reference"]
    assert runs["grpc:cpu+cpu+cpu-even"]["equal_to_reference"]
    assert [p["device"] for p in runs["grpc:cpu+cpu+cpu-even"]["plan"]] == ["cpu"] * 3
    assert runs["grpc:cpu+cpu-by-speed"]["equal_to_reference"]
    assert runs["cli:generate --nodes 2"]["equal_to_reference"]
    assert len(runs["cpu-1node-fp32"]["ids"]) == 8
    assert "RESULT: PASS" in r.stdout


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_node_without_kv_heads_keeps_up(tiny_model_dir, tmp_path, monkeypatch):
    # tiny-llama has 2 KV heads: over 3 even nodes the last one gets FFN columns only.
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    dc, d = _script(), tiny_model_dir("tiny-llama")
    ids = [5, 6, 7, 8]
    ref = dc.run_one(d, ids, 4, ["cpu"], ["fp32"])
    assert dc.run_one(d, ids, 4, ["cpu"] * 3, ["fp32"] * 3)["ids"] == ref["ids"]


# ---- CUDA only ----------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("window", [None, 2])
def test_store_on_cuda_holds_the_same_weights_as_on_cpu(tiny_model_dir, tmp_path, window, monkeypatch):
    from tpi_node.comm.collective import LocalCollective
    from tpi_node.engine.runner import open_runner
    from tpi_node.weights.checkpoint import model_digest

    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    d = tiny_model_dir("tiny-qwen2")
    cfg = ModelConfig.from_dir(d)
    plan = make_plan(cfg, [NodeCapacity("local", 1 << 40, 1)], model_digest(d))
    cpu = open_runner(d, cfg, plan, 0, LocalCollective(), "fp32", None, device="cpu", progress=False)
    gpu = open_runner(d, cfg, plan, 0, LocalCollective(), "fp32", window, device="cuda", progress=False)
    for _ in range(2):  # twice: the window wraps and reuses its buffers
        for i in range(cfg.num_layers):
            with cpu.store.layer(i) as a, gpu.store.layer(i) as b:
                for name in ("wqkv", "bqkv", "wo", "w13", "w2"):
                    x, y = getattr(a, name), getattr(b, name)
                    assert y.device.type == "cuda" and torch.equal(x, y.cpu()), name
    gpu.store.close()
    cpu.store.close()


@needs_cuda
def test_device_hop_moves_cuda_partials_through_pinned_host_memory():
    g = InProcessGroup(2)
    hop = DeviceHop(g.member(0), wire_dtype=torch.float32)
    cpu_side = g.member(1)
    for T in (5, 1, 7):  # the buffer is reused and regrown
        a = torch.randn(T, 32, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(T, 32)
        ra, rb = _run_ranks([lambda: hop.allreduce(a), lambda: cpu_side.allreduce(b)])
        assert ra.device.type == "cuda" and ra.dtype == torch.bfloat16
        assert torch.equal(rb, a.float().cpu() + b)
        assert hop._host.is_pinned()
