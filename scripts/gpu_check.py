"""GPU check for issues 8 and 17 (one GPU, no network; ~20 s of work after start-up on an H100).

1. detection, printed as the daemon logs it at start;
2. fused add+RMSNorm kernel vs torch at bf16 tolerance (both against a float64 reference),
   outputs poisoned with NaN first so an unwritten element fails;
3. fused kernel time vs unfused torch, tokens 1..8192, hidden 4096 and 8192: eager (each side
   launched from Python, L2 flushed between calls by do_bench) and CUDA graph (one call captured
   per side and replayed: one graph launch per call for both sides, L2 flushed as well);
4. a token-split step (2 layers: causal attention over a shared KV buffer, MLP, fused
   add+norm) on two CUDA streams vs the unsplit step;
5. the multimem kernel: compiled for this GPU (ptxas must accept multimem.ld_reduce /
   multimem.st, and every one of them must stay under its lane mask in the SASS), then launched
   with every lane masked off and no multicast address, in a child process (a fault there cannot
   break this one): the launch that hit an illegal address on 2026-11-26. A run on data needs
   several GPUs on NVSwitch.
Exit status 1 if a correctness check fails. The timing table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tpi_node.gpu.detect import SystemProbe, detect_and_log  # noqa: E402
from tpi_node.gpu.fused import add_rms_norm_reference, kernel_applies  # noqa: E402
from tpi_node.gpu.split import run_split, split_point  # noqa: E402

EPS = 1e-5
DEV = "cuda"  # --dry-run: "cpu" (Triton interpreter, small sizes, no timing): checks this script
TOKENS = [1, 4, 16, 64, 256, 1024, 2048, 4096, 8192]
HIDDEN = [4096, 8192]
results: dict = {"checks": [], "timing": []}


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def check(name: str, ok: bool, detail: str) -> None:
    results["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp64_reference(p, r, w, eps):
    x = r.double() + p.double()
    return x, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def correctness(kern) -> None:
    sizes = [(T, H) for H in (4096, 8192, 5120, 1000) for T in (1, 7, 128, 1000, 4096)]
    for T, H in sizes if DEV == "cuda" else [(1, 1000), (7, 64)]:
        g = torch.Generator(device=DEV).manual_seed(T * 31 + H)
        p = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=g)
        r = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=g) * 4
        w = torch.rand(H, device=DEV, dtype=torch.bfloat16, generator=g) + 0.5
        assert kernel_applies(p, r, w) or DEV == "cpu"
        xo = torch.full_like(r, float("nan"))
        ho = torch.full_like(r, float("nan"))
        x, h = kern.add_rms_norm(p, r, w, EPS, x_out=xo, h_out=ho)
        sync()
        xt, ht = add_rms_norm_reference(p, r, w, EPS)
        x64, h64 = fp64_reference(p, r, w, EPS)
        unwritten = int(x.isnan().sum() + h.isnan().sum())
        e_k, e_t = rel(h, h64), rel(ht, h64)
        x_same = (x == xt).float().mean().item()
        ok = unwritten == 0 and e_k < 1e-2 and e_k <= 1.5 * e_t + 1e-4 and rel(x, x64) < 1e-2
        check(
            f"fused T={T} H={H}",
            ok,
            f"h rel err vs fp64 {e_k:.2e} (torch {e_t:.2e}), vs torch bf16 {rel(h, ht):.2e}; "
            f"x bit-equal to torch {x_same:.4f}; unwritten {unwritten}",
        )


def bench_pair(fn_torch, fn_fused, graph: bool) -> tuple[float, float]:
    import triton.testing

    out = []
    for fn in (fn_torch, fn_fused):
        if graph:
            fn()  # warm: compile / allocator
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        else:
            run = fn
        out.append(triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median") * 1e3)
    return out[0], out[1]


def timing(kern) -> None:
    for H in HIDDEN:
        w = torch.rand(H, device=DEV, dtype=torch.bfloat16) + 0.5
        for T in TOKENS:
            p = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
            r = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
            xo, ho = torch.empty_like(r), torch.empty_like(r)
            f_torch = lambda: add_rms_norm_reference(p, r, w, EPS)  # noqa: E731
            f_fused = lambda: kern.add_rms_norm(p, r, w, EPS, x_out=xo, h_out=ho)  # noqa: E731
            te, fe = bench_pair(f_torch, f_fused, graph=False)
            tg, fg = bench_pair(f_torch, f_fused, graph=True)
            gbs = 4 * T * H * 2 / (fg * 1e-6) / 1e9  # read p, r; write x, h
            results["timing"].append(
                dict(
                    tokens=T,
                    hidden=H,
                    torch_eager_us=te,
                    fused_eager_us=fe,
                    torch_graph_us=tg,
                    fused_graph_us=fg,
                    fused_graph_GBps=gbs,
                )
            )
            print(f"timed T={T} H={H}: eager {te:.1f}/{fe:.1f} us, graph {tg:.1f}/{fg:.1f} us", flush=True)


def split_step(coll, sm_count: int) -> None:
    """Two toy layers, split in two halves on two streams vs unsplit, bf16 on one GPU."""
    T, H, nh, F_ = (4096, 4096, 32, 8192) if DEV == "cuda" else (256, 128, 4, 256)
    hd = H // nh
    g = torch.Generator(device=DEV).manual_seed(7)
    mk = lambda *s: (torch.randn(*s, device=DEV, generator=g) / math.sqrt(s[-1])).to(torch.bfloat16)  # noqa: E731
    layers = [
        dict(
            wqkv=mk(3 * H, H),
            wo=mk(H, H),
            w13=mk(2 * F_, H),
            w2=mk(H, F_),
            n2=torch.ones(H, device=DEV, dtype=torch.bfloat16),
        )
        for _ in range(2)
    ]
    kv = [torch.empty(2, T, nh, hd, device=DEV, dtype=torch.bfloat16) for _ in layers]
    stages = []
    for i, lw in enumerate(layers):

        def attn(p, sl, st, lw=lw, kvi=kv[i]):
            x, h = st
            q, k, v = (h @ lw["wqkv"].T).view(-1, 3, nh, hd).unbind(1)
            kvi[0, sl], kvi[1, sl] = k, v  # this part's KV entries
            keys, vals = kvi[0, : sl.stop], kvi[1, : sl.stop]  # causal: every earlier token
            mask = torch.arange(sl.stop, device=DEV)[None, :] <= torch.arange(sl.start, sl.stop, device=DEV)[:, None]
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1), attn_mask=mask
            )
            return x, o.transpose(0, 1).reshape(-1, H) @ lw["wo"].T

        def mlp(p, sl, st, lw=lw):
            x, h = st
            a = h @ lw["w13"].T
            return x, (F.silu(a[:, :F_]) * a[:, F_:]) @ lw["w2"].T

        def reduce(p, sl, st, lw=lw):
            return coll.allreduce_add_norm(st[1], st[0], lw["n2"], EPS)

        stages += [attn, reduce, mlp, reduce]

    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    h = add_rms_norm_reference(torch.zeros_like(x), x, layers[0]["n2"], EPS)[1]
    cut = split_point(T, sm_count=sm_count, threshold=min(1024, T))
    streams = (torch.cuda.Stream(), torch.cuda.Stream()) if DEV == "cuda" else None

    def run(split: bool):
        for t in kv:
            t.fill_(float("nan"))  # a read of KV nobody wrote yet would poison the output
        if not split:
            return run_split([(x, h)], [slice(0, T)], stages)[0]
        b = [slice(0, cut), slice(cut, T)]
        a_, b_ = run_split([(x[b[0]], h[b[0]]), (x[b[1]], h[b[1]])], b, stages, streams=streams)
        return torch.cat([a_[0], b_[0]]), torch.cat([a_[1], b_[1]])

    def timed(split: bool) -> float:
        ts = []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            run(split)
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]

    whole, parts = run(False), run(True)
    sync()
    ex, eh = rel(parts[0], whole[0]), rel(parts[1], whole[1])
    nan = int(parts[0].isnan().sum() + parts[1].isnan().sum())
    tw, ts = timed(False), timed(True)
    results["split"] = dict(tokens=T, cut=cut, rel_x=ex, rel_h=eh, unsplit_ms=tw, split_ms=ts)
    check(
        f"token split T={T} cut at {cut}",
        nan == 0 and ex < 1e-2 and eh < 2e-2,
        f"split vs unsplit rel err x {ex:.2e}, h {eh:.2e}; NaN {nan}; "
        f"step {tw:.2f} ms unsplit, {ts:.2f} ms split (1 GPU: no communication to overlap)",
    )


MASKED_LAUNCH = """
import torch
from tpi_node.gpu import triton_multimem as mm
r = torch.zeros(4, 8, device="cuda", dtype=torch.bfloat16)
w = torch.ones(8, device="cuda", dtype=torch.bfloat16)
# H = 0: every lane masked off; multicast addresses 0 (check_launch would refuse them: called directly)
mm._multimem_add_rms_norm_kernel[(4,)](0, 0, 0, r, r, r, 0, r, r.stride(0), w, 4, 0, 1e-6, 0, 1, BV=1, EMULATE=False)
torch.cuda.synchronize()
print("masked launch ok")
"""


def multimem_masked_launch() -> None:
    """The launch of 2026-11-26 (every lane masked off, address 0), in a child process. It hit an
    illegal address then: ptxas 12.x dropped the predicate of `@p multimem.st`, so masked lanes
    stored to address 0. The kernel now branches around its multimem instructions."""
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", MASKED_LAUNCH], capture_output=True, text=True, timeout=120, env=env)
    ok = r.returncode == 0 and "masked launch ok" in r.stdout
    check("multimem kernel, every lane masked off", ok, "no fault" if ok else (r.stderr or r.stdout)[-600:])


def multimem_compile(multicast: bool | None) -> None:
    """Compile for this GPU: ptxas must accept multimem.ld_reduce / multimem.st (that every one
    stays under its lane mask is checked on the CPU: tests/test_gpu_cpu.py builds the SASS)."""
    import triton
    from triton.compiler import ASTSource

    from tpi_node.gpu import triton_multimem as mm

    sig = {
        "mc_p": "i64",
        "mc_x": "i64",
        "mc_h": "i64",
        "emu_p": "*i32",
        "emu_x": "*i32",
        "emu_h": "*i32",
        "emu_stride": "i32",
        "r_ptr": "*bf16",
        "stride_r": "i32",
        "w_ptr": "*bf16",
        "T": "i32",
        "H": "i32",
        "eps": "fp32",
        "rank": "i32",
        "world": "i32",
        "BV": "constexpr",
        "EMULATE": "constexpr",
    }
    src = ASTSource(mm._multimem_add_rms_norm_kernel, sig, constexprs={"BV": 512, "EMULATE": False})
    target = triton.runtime.driver.active.get_current_target()
    k = triton.compile(src, target=target, options={"num_warps": 8})
    ptx = k.asm.get("ptx", "")
    n_ld, n_st = ptx.count("multimem.ld_reduce"), ptx.count("multimem.st")
    check(
        "multimem kernel compiles for this GPU",
        n_ld > 0 and n_st > 0 and len(k.asm.get("cubin", b"")) > 0,
        f"PTX has {n_ld} multimem.ld_reduce, {n_st} multimem.st; ptxas built the cubin for {target.arch}; "
        f"multicast on this machine: {multicast}; not run on data (needs >= 2 GPUs on NVSwitch)",
    )


def nccl_smoke() -> None:
    """A one-rank NCCL group: the NcclCollective's process-group set-up and all_reduce work."""
    import torch.distributed as dist

    from tpi_node.comm.nccl import init_nccl

    init_nccl(0, 1, "tcp://127.0.0.1:29517")
    t = torch.arange(8, device=DEV, dtype=torch.bfloat16)
    dist.all_reduce(t)
    torch.cuda.synchronize()
    check(
        "NCCL 1-rank all_reduce",
        torch.equal(t.cpu(), torch.arange(8, dtype=torch.bfloat16)),
        f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}",
    )
    dist.destroy_process_group()


def print_table() -> None:
    print(
        "\n| tokens | hidden | torch eager us | fused eager us | speedup | torch graph us | fused graph us | speedup "
        "| fused GB/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in results["timing"]:
        print(
            f"| {t['tokens']} | {t['hidden']} | {t['torch_eager_us']:.1f} | {t['fused_eager_us']:.1f} | "
            f"{t['torch_eager_us'] / t['fused_eager_us']:.2f}x | {t['torch_graph_us']:.1f} | "
            f"{t['fused_graph_us']:.1f} | {t['torch_graph_us'] / t['fused_graph_us']:.2f}x | "
            f"{t['fused_graph_GBps']:.0f} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-check")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU only, with TRITON_INTERPRET=1: exercise this script without a GPU"
    )
    args = ap.parse_args()
    global DEV
    DEV = "cpu" if args.dry_run else "cuda"
    os.makedirs(args.out, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    import triton

    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        card, sms = props.name, props.multi_processor_count
    else:
        card, sms = "cpu (dry run, Triton interpreter)", 132
    results["env"] = dict(
        card=card,
        sm_count=sms,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    print(json.dumps(results["env"]), flush=True)
    print("--- detection (as logged by the daemon at start)", flush=True)
    decision = detect_and_log()
    results["detection"] = decision.as_dict()
    check("detection", decision.fused_kernel or DEV == "cpu", decision.summary())

    from tpi_node.comm.nccl import NcclCollective
    from tpi_node.gpu import triton_add_norm as kern

    steps = [
        ("correctness", lambda: correctness(kern)),
        ("nccl", nccl_smoke),
        ("token split", lambda: split_step(NcclCollective(decision), sms)),
        ("timing", lambda: timing(kern)),
        ("multimem compile", lambda: multimem_compile(SystemProbe().multicast(0))),
        ("multimem masked launch", multimem_masked_launch),
    ]
    if DEV == "cpu":
        steps = [steps[0], steps[2]]
    for name, step in steps:
        print(f"--- {name} ({time.time() - t0:.0f} s)", flush=True)
        try:
            step()
        except Exception as e:  # report and go on: one broken step must not hide the others
            check(name, False, f"{type(e).__name__}: {e}")
    results["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    failed = [c for c in results["checks"] if not c["ok"]]
    print(
        f"\n{len(results['checks']) - len(failed)}/{len(results['checks'])} checks passed "
        f"in {results['seconds']:.0f} s on {card}; detection: {decision.summary()}"
    )
    print_table()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
