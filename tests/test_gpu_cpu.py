"""GPU fast path, the parts a machine without a GPU can check (issue 8).

Detection runs against a fake probe (the Probe protocol of gpu/detect.py); the split point and
the split schedule are pure; the Triton kernels run in Triton's CPU interpreter when triton is
installed (a subprocess with TRITON_INTERPRET=1), and are skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi_node.comm.collective import LocalCollective
from tpi_node.gpu.detect import GpuInfo, SystemProbe, detect, detect_and_log
from tpi_node.gpu.fused import add_rms_norm, add_rms_norm_reference, kernel_applies
from tpi_node.gpu.split import run_split, split_point, split_schedule, wave_waste

H100 = ("NVIDIA H100 80GB HBM3", (9, 0), 132)
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0), 108)


class FakeProbe:
    """A machine described by data: GPUs, NVLink pairs (None = NVML unavailable), multicast."""

    def __init__(self, n=0, gpu=H100, nvlink=True, missing_links=(), multicast=True, triton=True):
        self._gpus = [GpuInfo(i, *gpu) for i in range(n)]
        self._nvlink, self._missing = nvlink, {frozenset(p) for p in missing_links}
        self._multicast, self._triton = multicast, triton

    def gpus(self):
        return self._gpus

    def nvlink_p2p(self, a, b):
        if self._nvlink is None:
            return None
        return self._nvlink and frozenset((a, b)) not in self._missing

    def multicast(self, index):
        return self._multicast

    def triton(self):
        return self._triton


# -- detection -----------------------------------------------------------------------------------


def test_hopper_nvlink_multicast_turns_multimem_on():
    d = detect(FakeProbe(8))
    assert (d.collective, d.enabled, d.fused_kernel, d.nvlink, d.multicast) == ("multimem", True, True, True, True)
    assert "8x NVIDIA H100" in d.reason and d.sm_count == 132
    assert d.summary().startswith("gpu detection: ") and "allows an NVLink group with multicast" in d.summary()


def test_hopper_nvlink_without_multicast_uses_nccl():
    d = detect(FakeProbe(4, multicast=False))
    assert (d.collective, d.enabled, d.multicast) == ("nccl", True, False)
    assert "no multicast" in d.reason


@pytest.mark.parametrize(
    "probe, collective, reason",
    [
        (FakeProbe(0), "off", "no CUDA device"),
        (FakeProbe(8, gpu=A100), "off", "sm_80; the fast path needs Hopper"),
        (FakeProbe(4, missing_links=[(1, 3)]), "off", "GPUs 1 and 3 have no NVLink"),
        (FakeProbe(2, nvlink=None), "off", "nvidia-ml-py missing"),
        (FakeProbe(1), "off", "1 GPU"),
    ],
)
def test_otherwise_off_with_the_reason(probe, collective, reason):
    d = detect(probe)
    assert d.collective == collective and not d.enabled
    assert reason in d.reason and "allows no NVLink group" in d.summary()


def test_fused_kernel_needs_triton_and_sm80():
    assert detect(FakeProbe(1)).fused_kernel  # one Hopper GPU: no collective, kernel still on
    no_triton = detect(FakeProbe(8, triton=False))
    assert no_triton.enabled and not no_triton.fused_kernel
    assert any("triton not installed" in n for n in no_triton.notes)
    old = ("Tesla V100", (7, 0), 80)
    assert not detect(FakeProbe(2, gpu=old)).fused_kernel


def test_detect_and_log_logs_once_and_survives_a_broken_probe(caplog):
    class Broken(FakeProbe):
        def gpus(self):
            raise RuntimeError("driver went away")

    with caplog.at_level(logging.DEBUG, logger="tpi_node.gpu"):
        d = detect_and_log(FakeProbe(8))
        bad = detect_and_log(Broken())
    assert d.summary() in caplog.text
    assert not bad.enabled and "driver went away" in bad.reason
    assert bad.as_dict()["summary"] in caplog.text


def test_real_probe_on_this_machine_says_off_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = detect(SystemProbe())
    assert d.collective == "off" and d.reason == "no CUDA device"


def test_gpu_modules_import_without_triton_nvml_or_cuda():
    # Block triton and pynvml in a fresh interpreter: the package must still import and decide.
    code = textwrap.dedent("""
        import sys
        sys.modules['triton'] = None
        sys.modules['pynvml'] = None
        import tpi_node.gpu.detect as d, tpi_node.gpu.fused as f, tpi_node.gpu.split, tpi_node.comm.nccl
        assert f.triton_kernels() is None
        print(d.detect().summary())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpu detection" in out.stdout


# -- fused add + RMSNorm on CPU: the exact reference ------------------------------------------


def test_fused_falls_back_to_the_collective_definition_on_cpu():
    torch.manual_seed(1)
    p, r = torch.randn(2, 5, 64, dtype=torch.bfloat16), torch.randn(2, 5, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    assert not kernel_applies(p, r, w)
    x, h = add_rms_norm(p, r, w, 1e-5)
    x0, h0 = LocalCollective().allreduce_add_norm(p, r, w, 1e-5)
    assert torch.equal(x, x0) and torch.equal(h, h0)


def test_nccl_collective_world_one_matches_local():
    from tpi_node.comm.nccl import NcclCollective

    coll = NcclCollective(detect(FakeProbe(0)))
    p, r, w = torch.randn(7, 32), torch.randn(7, 32), torch.rand(32)
    x, h = coll.allreduce_add_norm(p, r, w, 1e-6)
    x0, h0 = LocalCollective().allreduce_add_norm(p, r, w, 1e-6)
    assert torch.equal(x, x0) and torch.equal(h, h0) and coll.stats.calls == 1


# -- split point ---------------------------------------------------------------------------------


def test_split_point_threshold_is_configurable():
    assert split_point(1023, sm_count=132) == 0
    assert split_point(1024, sm_count=132) > 0
    assert split_point(600, sm_count=132, threshold=512) > 0
    assert split_point(4096, sm_count=132, threshold=8192) == 0
    with pytest.raises(ValueError, match="sm_count"):
        split_point(4096, sm_count=0)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1024, 65536),
    sms=st.integers(1, 160),
    tile=st.sampled_from([16, 64, 128, 256]),
    rows=st.integers(1, 4),
)
def test_split_point_is_a_tile_multiple_near_the_middle_with_least_tail(n, sms, tile, rows):
    s = split_point(n, sm_count=sms, tile=tile, rows_per_sm=rows)
    assert 0 < s < n and s % tile == 0
    wave = sms * rows
    naive = min(max(tile, round(n / 2 / tile) * tile), n - tile)
    if abs(naive - n / 2) <= n / 8:  # the plain rounding is a candidate: s must do no worse
        assert wave_waste(s, wave) + wave_waste(n - s, wave) <= wave_waste(naive, wave) + wave_waste(n - naive, wave)
        assert abs(s - n / 2) <= n / 8


def test_split_point_follows_the_sm_count():
    # 2048 tokens, tile 128: the candidates are 896..1152; the chosen one must leave the fewest
    # idle rows in the last waves for that SM count.
    for sms in (64, 108, 132):
        s = split_point(2048, sm_count=sms)
        best = min(wave_waste(c, sms) + wave_waste(2048 - c, sms) for c in range(896, 1153, 128))
        assert wave_waste(s, sms) + wave_waste(2048 - s, sms) == best
    assert split_point(2048, sm_count=64) == 1024  # no idle rows at the middle: the middle wins


# -- split schedule: split and unsplit give the same output --------------------------------------


def _toy_layers(n_layers, T, H, seed=0):
    """A small decoder with a causal attention-like mix over a per-layer KV store, in float64."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1])
    layers = [
        dict(
            wk=mk(H, H), wv=mk(H, H), wo=mk(H, H), w1=mk(2 * H, H), w2=mk(H, H), n1=1 + 0.1 * mk(H), n2=1 + 0.1 * mk(H)
        )
        for _ in range(n_layers)
    ]
    kv = [
        dict(k=torch.zeros(T, H, dtype=torch.float64), v=torch.zeros(T, H, dtype=torch.float64))
        for _ in range(n_layers)
    ]
    coll, eps = LocalCollective(), 1e-6
    stages = []
    for i, w in enumerate(layers):

        def attn(p, sl, state, w=w, kvi=kv[i]):
            x, h = state
            kvi["k"][sl], kvi["v"][sl] = h @ w["wk"].T, h @ w["wv"].T  # this part's KV entries
            q = h
            keys, vals = kvi["k"][: sl.stop], kvi["v"][: sl.stop]  # causal: all earlier tokens
            scores = q @ keys.T
            pos = torch.arange(sl.start, sl.stop)[:, None]
            scores = scores.masked_fill(torch.arange(sl.stop)[None, :] > pos, float("-inf"))
            return x, torch.softmax(scores, -1) @ vals @ w["wo"].T  # partial [t, H]

        def reduce_attn(p, sl, state, w=w):
            x, partial = state
            return coll.allreduce_add_norm(partial, x, w["n2"], eps)

        def mlp(p, sl, state, w=w):
            x, h = state
            a = h @ w["w1"].T
            return x, (torch.nn.functional.silu(a[:, :H]) * a[:, H:]) @ w["w2"].T

        def reduce_mlp(p, sl, state, w=w, nxt=layers[(i + 1) % n_layers]["n1"]):
            x, partial = state
            return coll.allreduce_add_norm(partial, x, nxt, eps)

        stages += [attn, reduce_attn, mlp, reduce_mlp]
    return layers, stages


def _run(x, cut, order=None):
    T, H = x.shape
    layers, stages = _toy_layers(3, T, H)
    h = add_rms_norm_reference(torch.zeros_like(x), x, layers[0]["n1"], 1e-6)[1]
    bounds = [slice(0, T)] if cut == 0 else [slice(0, cut), slice(cut, T)]
    states = [(x[b], h[b]) for b in bounds]
    if order is not None:  # run the parts whole, in the given order (no interleaving)
        out = [None] * len(states)
        for p in order:
            s = states[p]
            for st_ in stages:
                s = st_(p, bounds[p], s)
            out[p] = s
        states = out
    else:
        states = run_split(states, bounds, stages)
    return torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states])


def test_split_schedule_interleaves_parts_stage_by_stage():
    assert split_schedule(3) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert split_schedule(2, n_parts=1) == [(0, 0), (0, 1)]


def test_split_and_unsplit_schedules_give_the_same_output():
    T, H = 40, 16
    x = torch.randn(T, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole_x, whole_h = _run(x, 0)
    for cut in (8, 24, 33):
        xs, hs = _run(x, cut)
        torch.testing.assert_close(xs, whole_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hs, whole_h, rtol=1e-12, atol=1e-12)
    # The check can fail: B before A (its attention then misses A's KV) changes the output.
    bad_x, _ = _run(x, 24, order=[1, 0])
    assert not torch.allclose(bad_x[24:], whole_x[24:], atol=1e-6)


# -- Triton kernels in the CPU interpreter ------------------------------------------------------

_INTERPRETED = textwrap.dedent("""
    import torch
    from tpi_node.gpu import triton_add_norm, triton_multimem
    from tpi_node.gpu.fused import add_rms_norm_reference as ref
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()
    torch.manual_seed(0)
    # The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): a few 1e-3 of error.
    for T, H in [(1, 4096), (3, 1000), (5, 8192)]:
        p, r = torch.randn(T, H, dtype=torch.bfloat16), torch.randn(T, H, dtype=torch.bfloat16)
        w = torch.randn(H, dtype=torch.bfloat16)
        x, h = triton_add_norm.add_rms_norm(p, r, w, 1e-6)
        x0, h0 = ref(p, r, w, 1e-6)
        assert rel(x, x0) < 2e-2 and rel(h, h0) < 2e-2, (T, H, rel(x, x0), rel(h, h0))
    # Multimem kernel, multicast emulated over W stacked buffers; every rank runs its rows. World
    # size 1, and H = 576 (SmolLM2: 72 chunks in a block of 128, the rest masked off).
    for W, T, T_max, H in [(2, 5, 8, 64), (4, 3, 4, 1016), (3, 7, 7, 4096), (1, 3, 4, 576), (2, 3, 4, 576)]:
        parts = torch.randn(W, T, H, dtype=torch.bfloat16)
        r, w = torch.randn(T, H, dtype=torch.bfloat16), torch.randn(H, dtype=torch.bfloat16)
        P = torch.zeros(W, T_max * H, dtype=torch.bfloat16)
        P[:, : T * H] = parts.reshape(W, -1)
        X = torch.full((W, T_max * H), float("nan"), dtype=torch.bfloat16)
        Hs = X.clone()
        i32 = lambda t: t.view(torch.int32)
        for rank in range(W):
            triton_multimem.emulated_multimem_add_rms_norm(i32(P), i32(X), i32(Hs), r, w, 1e-6, rank, W)
        x0, h0 = ref(parts.float().sum(0).to(torch.bfloat16), r, w, 1e-6)
        for s in range(W):
            x, h = X[s, : T * H].view(T, H), Hs[s, : T * H].view(T, H)
            assert not x.isnan().any() and not h.isnan().any(), "a row was not written"
            assert rel(x, x0) < 2e-2 and rel(h, h0) < 2e-2, (W, T, H, s, rel(x, x0), rel(h, h0))
            assert X[s, T * H :].isnan().all() and Hs[s, T * H :].isnan().all(), "written past the last row"
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (tpi-node[gpu])")
def test_triton_kernels_in_the_cpu_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# -- the multimem kernel as ptxas builds it for Hopper (no GPU needed) ---------------------------

_SASS = textwrap.dedent("""
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tpi_node.gpu import triton_multimem as mm
    sig = {n: t for n, t in zip(
        ["mc_p", "mc_x", "mc_h", "emu_p", "emu_x", "emu_h", "emu_stride", "r_ptr", "stride_r", "w_ptr", "T", "H",
         "eps", "rank", "world", "BV", "EMULATE"],
        ["i64"] * 3 + ["*i32"] * 3 + ["i32", "*bf16", "i32", "*bf16", "i32", "i32", "fp32", "i32", "i32"]
        + ["constexpr"] * 2)}
    bv = int(sys.argv[1])
    src = ASTSource(mm._multimem_add_rms_norm_kernel, sig, constexprs={"BV": bv, "EMULATE": False})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": mm.grid_and_block(1, 8 * bv, 1)[2]})
    open(sys.argv[2], "wb").write(k.asm["cubin"])
""")


def _triton_bin(name: str) -> str | None:
    spec = importlib.util.find_spec("triton")
    path = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name) if spec else ""
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(_triton_bin("cuobjdump") is None, reason="triton (with its CUDA tools) not installed")
@pytest.mark.parametrize("ptxas", ["ptxas", "ptxas-blackwell"])
def test_multimem_kernel_leaves_masked_lanes_alone_in_sass(tmp_path, ptxas):
    # The illegal address of the first H100 run: ptxas 12.x (the `ptxas` Triton's wheel carries,
    # and Triton 3.6's only one) turned a predicated `multimem.st` into an unconditional store, so
    # masked lanes wrote 16 bytes anyway. Built here for sm_90a with both of the wheel's ptxas:
    # every multicast load (LDGMC) must be predicated, every store (multimem.st is an STG to the
    # multicast address) predicated or after a predicated EXIT that follows the loads.
    if _triton_bin(ptxas) is None:
        pytest.skip(f"this triton has no {ptxas}")
    env = dict(os.environ, TRITON_PTXAS_BLACKWELL_PATH=_triton_bin(ptxas), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    for bv in (1, 128):  # H = 8 (one chunk, every other lane a copy) and H = 576 (masked tail)
        cubin = tmp_path / f"mm{bv}.cubin"
        out = subprocess.run(
            [sys.executable, "-c", _SASS, str(bv), str(cubin)], capture_output=True, text=True, timeout=240, env=env
        )
        assert out.returncode == 0, out.stderr[-3000:]
        sass = subprocess.run(
            [_triton_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, timeout=60
        ).stdout
        ops = [line.split("*/", 1)[1].strip() for line in sass.splitlines() if line.strip().startswith("/*0")]
        loads, guarded = 0, False
        for op in ops:
            if "LDGMC" in op:
                assert op.startswith("@"), f"unpredicated multicast load: {op}"
                loads, guarded = loads + 1, False
            elif op.startswith(("@P", "@!P")) and "EXIT" in op and loads:
                guarded = True
            elif op.startswith("STG"):
                assert guarded, f"{ptxas}, BV={bv}: a store no mask guards: {op}\n" + "\n".join(ops)
        assert loads and any("STG" in op for op in ops)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (tpi-node[gpu])")
def test_multimem_asm_branches_around_instead_of_predicating():
    # Newer ptxas keeps the predicate, so the SASS test alone would pass a predicated form again.
    import re

    from tpi_node.gpu import triton_multimem as mm

    for asm in (mm._LD_REDUCE.value, mm._ST.value):
        assert "multimem." in asm and not re.search(r"@!?%\w+\s+multimem", asm)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed (tpi-node[gpu])")
def test_multimem_launch_refuses_what_would_fault():
    from tpi_node.gpu import triton_multimem as mm

    r, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no multicast address"):
        mm.multimem_add_rms_norm(0, 0, 0, r, w, 1e-6, 0, 2)  # symmetric memory without multicast
    with pytest.raises(ValueError, match="16-byte aligned"):
        mm.multimem_add_rms_norm(1 << 40, (1 << 40) + 8, 1 << 41, r, w, 1e-6, 0, 2)
    with pytest.raises(ValueError, match="H % 8"):
        mm.multimem_add_rms_norm(1 << 40, 1 << 41, 1 << 42, r[:, :60], w[:60], 1e-6, 0, 2)
    assert mm.grid_and_block(5, 576, 2) == ((3,), 128, 4)  # one 16-byte chunk per thread
