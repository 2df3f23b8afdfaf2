#!/usr/bin/env python3
"""Device check (issue 9): the same greedy text on a CUDA node, a CPU node and mixed clusters of
real `tpi-node` processes meeting over gRPC on loopback.

For each model (made here from a seed, or a directory), greedy, N tokens, EOS ignored, fp32:
  1. reference: one node on cpu (in this process);
  2. one node on DEVICE: token ids must equal the reference;
  3. gRPC clusters: the master (engine + ClusterMaster) in this process, every worker a
     `tpi-node join --device ...` child process; partials go device -> host -> gRPC -> host -> device:
       a. master DEVICE + worker cpu, even split          b. master cpu + worker DEVICE, even split
       c. master cpu + worker DEVICE + worker cpu, even   d. master DEVICE + worker cpu, split by
          measured speed (the CPU node gets few FFN columns and often no KV heads)
     each must equal the reference; and (tiny only) `tpi-node generate --nodes 2` as a command;
  4. one node on DEVICE in bf16 (text compared, reported, not required), cpu bf16 (small models);
  5. peak device memory of one DEVICE node with a window of W=2 layers vs all layers resident.
Plus, once: decode-shaped scaled_dot_product_attention timed per CUDA kernel setting (bf16 vs
fp32), and bf16 decode tokens/s per setting (engine/device.py SDPA_SETTINGS), to explain bf16.
Even splits give both devices real work to compare; the speed-weighted run is what a real mixed
cluster plans. A run that fails is recorded and the others still run. Past --deadline seconds the
remaining optional runs are skipped (reported), so one device call always ends with results.

    python3 scripts/device_check.py --device cuda --out results.json        (on the GPU machine)
    python3 scripts/device_check.py --device cpu --models tiny              (dry run: the flow)
Exit status 1 when a required equality fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from tpi_node.comm.collective import LocalCollective  # noqa: E402
from tpi_node.comm.device_hop import DeviceHop, InProcessGroup  # noqa: E402
from tpi_node.dtypes import DTYPES  # noqa: E402
from tpi_node.engine.device import (  # noqa: E402
    SDPA_SETTINGS,
    device_capacity,
    measure_speed,
    select_device,
    set_cuda_attention,
    synchronize,
)
from tpi_node.engine.engine import Engine  # noqa: E402
from tpi_node.engine.head import ModelHead  # noqa: E402
from tpi_node.engine.local import LocalDriver  # noqa: E402
from tpi_node.engine.runner import open_runner  # noqa: E402
from tpi_node.model.config import ModelConfig  # noqa: E402
from tpi_node.model.sampling_params import SamplingParams  # noqa: E402
from tpi_node.model.tokenizer import Tokenizer  # noqa: E402
from tpi_node.weights.checkpoint import model_digest  # noqa: E402
from tpi_node.weights.plan import NodeCapacity, make_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KV_BLOCKS = 256  # 4096 tokens of KV cache per rank: the checks generate a few dozen
PROMPT = "The history of the printing press begins"
SYNTH = {  # name -> (preset, layers): the tiny one hits biases + 3 KV heads over 2 nodes
    "tiny": ("tiny-qwen2", None),
    "random-0.5b": ("qwen2.5-0.5b", None),
}


class GroupDriver:
    """The Driver of ranks living as threads of this process: the step goes to every rank, rank 0's
    hidden states come back (every rank ends a layer with the same sum)."""

    def __init__(self, runners) -> None:
        self.runners = runners
        self.pool = ThreadPoolExecutor(max(1, len(runners) - 1), thread_name_prefix="rank")

    @staticmethod
    def _rank(runner, layout, x):
        try:
            return runner.forward(layout, x)
        except BaseException:
            runner.coll.close()  # breaks the group's barrier: the other ranks stop waiting
            raise

    def step(self, layout, x, kv_epoch=0, ask=None):
        """-> (hidden, None): the master holds the whole lm_head here (no --head-split)."""
        futures = [self.pool.submit(self._rank, r, layout, x) for r in self.runners[1:]]
        errors, h = [], None
        try:
            h = self._rank(self.runners[0], layout, x)
        except BaseException as e:
            errors.append(e)
        errors += [e for e in (f.exception() for f in futures) if e is not None]
        # The rank that failed first says why; the others only saw the barrier break.
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if errors:
            raise (real or errors)[0]
        return h, None

    def kv_blocks(self) -> int:
        return self.runners[0].kv.num_blocks

    def kv_epoch(self) -> int:
        return 0

    def free(self, seq_ids) -> None:
        pass  # the engine's block pool holds what the sequences had

    def ready(self) -> bool:
        return True

    def recover(self, error) -> bool:
        return False

    def stats(self) -> dict:
        return {f"rank{i}": r.stats.as_dict() for i, r in enumerate(self.runners)}

    def close(self) -> None:
        self.pool.shutdown()
        for r in self.runners:
            r.store.close()


def open_engine(
    model_dir: Path,
    devices: list[str],
    dtypes: list[str],
    window: int | None = None,
    plan_speeds: list[float] | None = None,
) -> Engine:
    """An engine over len(devices) ranks in this process; rank 0 is the master (embedding + head)."""
    cfg = ModelConfig.from_dir(model_dir)
    caps = [
        NodeCapacity(
            f"node{i}" if len(devices) > 1 else "local", 1 << 40, 1, speed=plan_speeds[i] if plan_speeds else None
        )
        for i in range(len(devices))
    ]
    plan = make_plan(cfg, caps, model_digest(model_dir))
    if len(devices) == 1:
        colls = [LocalCollective()]
    else:
        group = InProcessGroup(len(devices))
        colls = [DeviceHop(group.member(i), wire_dtype=torch.float32) for i in range(len(devices))]
    runners = [
        open_runner(
            model_dir, cfg, plan, i, colls[i], dtypes[i], window, device=devices[i], progress=False, kv_blocks=KV_BLOCKS
        )
        for i in range(len(devices))
    ]
    driver = LocalDriver(runners[0]) if len(runners) == 1 else GroupDriver(runners)
    head = ModelHead(model_dir, cfg, DTYPES[dtypes[0]], device=devices[0])
    return Engine(cfg, head, Tokenizer.from_dir(model_dir), driver, model_dir.name)


def generate(engine: Engine, prompt_ids: list[int], n: int) -> dict:
    """Greedy n tokens (EOS ignored): ids, text, decode tokens/s (after the first token)."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    list(engine.generate_sync(prompt_ids, SamplingParams(max_tokens=2, temperature=0)))  # warm-up
    ids, text, stamps = [], [], []
    for ev in engine.generate_sync(prompt_ids, params):
        stamps.append(time.perf_counter())
        ids.append(ev.token_id)
        text.append(ev.text)
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ids": ids, "text": "".join(text), "decode_tok_s": round(tps, 1)}


def close(engine: Engine) -> None:
    engine.shutdown()
    d = engine.driver
    d.close() if isinstance(d, GroupDriver) else d.runner.store.close()


def run_one(model_dir, prompt_ids, n, devices, dtypes, **kw) -> dict:
    t0 = time.perf_counter()
    engine = open_engine(model_dir, devices, dtypes, **kw)
    try:
        out = generate(engine, prompt_ids, n)
    finally:
        close(engine)
    out.update(devices=devices, dtypes=dtypes, seconds=round(time.perf_counter() - t0, 1))
    return out


def peak_memory(model_dir, prompt_ids, n, device: str, dtype: str, window: int | None) -> dict:
    """Peak bytes allocated on the device while opening the node and generating n tokens."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {"window": window, "peak_device_bytes": None, "note": "only measured on CUDA"}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    r = run_one(model_dir, prompt_ids, n, [device], [dtype], window=window)
    return {
        "window": window or "resident",
        "peak_device_bytes": torch.cuda.max_memory_allocated(dev) - base,
        "decode_tok_s": r["decode_tok_s"],
    }


# ---- real clusters: this process is the master, every worker a `tpi-node join` process -----------
T0 = time.monotonic()
DEADLINE = [float("inf")]  # seconds after T0 past which optional runs are skipped


def time_left() -> float:
    return DEADLINE[0] - (time.monotonic() - T0)


def tpi_node_cmd() -> list[str]:
    """How to start `tpi-node` here: the installed script, else `python -m tpi_node.cli`."""
    exe = Path(sys.executable).with_name("tpi-node")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "tpi_node.cli"]


def gpu_memory_of(pid: int) -> int | None:
    """MiB of GPU memory nvidia-smi counts for process pid (CUDA context included), or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1])
    return None


def run_cluster(
    model_dir: Path,
    prompt_ids: list[int],
    n: int,
    master_device: str,
    worker_devices: list[str],
    even: bool,
    log_dir: Path,
    label: str,
) -> dict:
    """A cluster of 1 + len(worker_devices) nodes over gRPC on loopback, fp32; greedy n tokens."""
    from tpi_node.commands.compose import start_master
    from tpi_node.commands.local_cluster import stop_children, wait_ready
    from tpi_node.settings import MasterSettings

    t0 = time.perf_counter()
    ms = MasterSettings(
        model=str(model_dir),
        dtype="fp32",
        device=master_device,
        peer_timeout=30.0,
        node_id="m",
        speed=1.0 if even else None,
    )
    dev = torch.device(master_device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    running = start_master(ms, 1 + len(worker_devices), 0)
    master, engine, port = running.master, running.engine, running.port
    children, logs = [], []
    try:
        for i, wd in enumerate(worker_devices, 1):
            log = log_dir / f"{label}-w{i}-{wd.replace(':', '')}.log"
            logs.append(log)
            cmd = tpi_node_cmd() + ["join", "--master", f"127.0.0.1:{port}", "--node-id", f"w{i}", "--device", wd]
            cmd += ["--speed", "1"] if even else []
            with open(log, "w") as fh:
                children.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT))
        try:
            wait_ready(running, children, timeout_s=max(60.0, min(240.0, time_left())))
        except Exception:
            for log in logs:
                tail = log.read_text(errors="replace").splitlines()[-6:]
                print(f"  {log.name}: " + "\n  ".join(tail), flush=True)
            raise
        ready_s = time.perf_counter() - t0
        out = generate(engine, prompt_ids, n)
        plan = [
            {"node": s.node_id, "device": d, "kv_heads": s.n_kv, "ffn_cols": s.ffn_end - s.ffn_start}
            for s, d in zip(master.membership.plan.shares, [master_device] + worker_devices)
        ]
        st = master.coordinator.deployment.runner.stats.as_dict()
        out.update(
            plan=plan,
            ready_s=round(ready_s, 1),
            master_step_split={k: round(st[k], 3) for k in ("wall_s", "compute_s", "comm_s")},
        )
        if dev.type == "cuda":
            out["master_peak_device_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        out["worker_gpu_mib"] = {
            f"w{i}": gpu_memory_of(c.pid)
            for i, (c, wd) in enumerate(zip(children, worker_devices), 1)
            if wd.startswith("cuda")
        }
    finally:
        running.stop()
        stop_children(children)
    out.update(devices=[master_device] + worker_devices, seconds=round(time.perf_counter() - t0, 1))
    return out


def run_cli_generate(model_dir: Path, n: int, master_device: str, worker_device: str) -> dict:
    """`tpi-node generate --nodes 2` as a user runs it: the master on master_device, its local worker
    (a child `tpi-node join`) on worker_device through TPI_DEVICE. -> the text printed."""
    env = {**os.environ, "TPI_DEVICE": worker_device}
    cmd = tpi_node_cmd() + [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        PROMPT,
        "--max-tokens",
        str(n),
        "--nodes",
        "2",
        "--device",
        master_device,
        "--dtype",
        "fp32",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=max(60, min(180, time_left())))
    speed = [ln for ln in r.stderr.splitlines() if "tokens/s" in ln]
    return {"rc": r.returncode, "text": r.stdout.removesuffix("\n"), "log": speed[-1] if speed else r.stderr[-400:]}


# ---- why bf16 decode was slow on CUDA -----------------------------------------------------------
def sdpa_probe(device: str, results: dict) -> None:
    """Decode-shaped attention alone: q [1, 3, 3, 64] (3 KV heads x 3 query heads each) against a
    cache of L keys with a bool mask [1, 1, 1, L], as attention_partial calls it; L grows by one per
    call (a new shape every call, as in decode) or stays fixed. ms per call, per kernel setting."""
    dev = torch.device(device)
    rows = {}
    for dtype in ("bf16", "fp32"):
        for setting in SDPA_SETTINGS:
            set_cuda_attention(setting)
            try:
                ms = {}
                for mode in ("growing", "fixed"):
                    calls = 24
                    Ls = [64 + i for i in range(calls)] if mode == "growing" else [64] * calls
                    tensors = [
                        (
                            torch.randn(1, 3, 3, 64, device=dev, dtype=DTYPES[dtype]),
                            torch.randn(1, 3, L, 64, device=dev, dtype=DTYPES[dtype]),
                            torch.randn(1, 3, L, 64, device=dev, dtype=DTYPES[dtype]),
                            torch.ones(1, 1, 1, L, dtype=torch.bool, device=dev),
                        )
                        for L in Ls
                    ]
                    synchronize(dev)
                    t0 = time.perf_counter()
                    for q, k, v, m in tensors:
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
                    synchronize(dev)
                    ms[mode] = round((time.perf_counter() - t0) / calls * 1e3, 3)
                rows[f"{dtype}/{setting}"] = ms
            except RuntimeError as e:
                rows[f"{dtype}/{setting}"] = {"error": str(e).splitlines()[0][:160]}
            print(f"sdpa {dtype:4s} {setting:13s}: {rows[f'{dtype}/{setting}']}", flush=True)
    set_cuda_attention()
    results["sdpa_ms_per_call"] = rows


def bf16_decode_probe(name: str, model_dir: Path, prompt_ids, n: int, device: str, ref_ids, results: dict) -> None:
    """bf16 decode tokens/s of one DEVICE node under each attention kernel setting."""
    rows = {}
    for setting in ("default", "no-cudnn", "mem-efficient", "math"):
        set_cuda_attention(setting)
        try:
            r = run_one(model_dir, prompt_ids, n, [device], ["bf16"])
            rows[setting] = {
                "decode_tok_s": r["decode_tok_s"],
                "same_as_fp32": sum(a == b for a, b in zip(r["ids"], ref_ids)),
            }
        except Exception as e:  # noqa: BLE001 - recorded, the other settings still run
            rows[setting] = {"error": f"{type(e).__name__}: {e}"[:200]}
        print(f"[{name}] bf16 decode, attention '{setting}': {rows[setting]}", flush=True)
    set_cuda_attention()
    results.setdefault("bf16_decode_by_attention", {})[name] = rows


# ---- one model ----------------------------------------------------------------------------------
def check_model(
    name: str, model_dir: Path, device: str, n: int, results: dict, log_dir: Path, probe_bf16: bool
) -> bool:
    tok = Tokenizer.from_dir(model_dir)
    prompt_ids = tok.encode(PROMPT)  # as `tpi-node generate` encodes a plain prompt
    cfg = ModelConfig.from_dir(model_dir)
    rows, ok, skipped = {}, True, []
    results["models"][name] = entry = {
        "dir": str(model_dir),
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "kv_heads": cfg.num_kv_heads,
        "runs": rows,
        "skipped": skipped,
    }
    say = lambda m: print(f"[{name}] {m}", flush=True)  # noqa: E731
    say(
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_kv_heads} kv heads, "
        f"{len(prompt_ids)} prompt tokens, {n} new; {time_left():.0f} s left"
    )
    rows["cpu-1node-fp32"] = ref = run_one(model_dir, prompt_ids, n, ["cpu"], ["fp32"])
    say(f"reference cpu fp32: {ref['decode_tok_s']} tok/s  text={ref['text']!r}")

    def check(key, fn, need_s):
        nonlocal ok
        if time_left() < need_s:
            skipped.append(key)
            say(f"{key}: SKIPPED ({time_left():.0f} s left)")
            return
        try:
            r = rows[key] = fn()
        except Exception as e:  # noqa: BLE001 - recorded as a failure; the other runs still measure
            r = rows[key] = {"error": f"{type(e).__name__}: {e}"[:300], "ids": None, "text": "", "decode_tok_s": 0.0}
            say(f"{key}: FAILED {r['error']}")
        r["equal_to_reference"] = r["ids"] == ref["ids"]
        ok &= r["equal_to_reference"]
        plan = (
            "  plan " + ", ".join(f"{p['device']}: {p['kv_heads']} kv + {p['ffn_cols']} ffn" for p in r["plan"])
            if r.get("plan")
            else ""
        )
        say(
            f"{key}: {'EQUAL' if r['equal_to_reference'] else 'DIFFERENT'}  {r['decode_tok_s']} tok/s"
            + (f"  ready in {r['ready_s']} s" if "ready_s" in r else "")
            + plan
            + ("" if r["equal_to_reference"] else f"  text={r['text']!r}")
        )

    big = cfg.num_layers * cfg.hidden_size * cfg.intermediate_size * 3 > 300e6
    need = 60 if big else 20  # rough seconds a cluster run needs here
    check(f"{device}-1node-fp32", lambda: run_one(model_dir, prompt_ids, n, [device], ["fp32"]), 10)
    check(
        f"grpc:{device}+cpu-even",
        lambda: run_cluster(model_dir, prompt_ids, n, device, ["cpu"], True, log_dir, f"{name}-a"),
        need,
    )
    check(
        f"grpc:cpu+{device}-even",
        lambda: run_cluster(model_dir, prompt_ids, n, "cpu", [device], True, log_dir, f"{name}-b"),
        need,
    )
    check(
        f"grpc:cpu+{device}+cpu-even",
        lambda: run_cluster(model_dir, prompt_ids, n, "cpu", [device, "cpu"], True, log_dir, f"{name}-c"),
        need,
    )
    check(
        f"grpc:{device}+cpu-by-speed",
        lambda: run_cluster(model_dir, prompt_ids, n, device, ["cpu"], False, log_dir, f"{name}-d"),
        need,
    )
    if name == "tiny" and time_left() > 30:
        r = rows["cli:generate --nodes 2"] = run_cli_generate(model_dir, n, device, "cpu")
        r["equal_to_reference"] = r["rc"] == 0 and r["text"] == ref["text"]
        ok &= r["equal_to_reference"]
        say(
            f"cli `tpi-node generate --nodes 2 --device {device}` + TPI_DEVICE=cpu worker: "
            f"{'EQUAL' if r['equal_to_reference'] else 'DIFFERENT'} text; {r['log']}"
        )
    is_gpu = torch.device(device).type != "cpu"
    if is_gpu and probe_bf16 and time_left() > 30:
        bf16_decode_probe(name, model_dir, prompt_ids, n, device, ref["ids"], results)
    if is_gpu and time_left() > 15:
        r = rows[f"{device}-1node-bf16"] = run_one(model_dir, prompt_ids, n, [device], ["bf16"])
        same = sum(a == b for a, b in zip(r["ids"], ref["ids"]))
        say(
            f"{device} bf16 (attention '{os.environ.get('TPI_CUDA_SDPA', 'no-cudnn')}'): {r['decode_tok_s']} tok/s, "
            f"{same}/{n} tokens as fp32 cpu"
        )
    if not big and time_left() > 15:  # bf16 on a CPU can be slow
        r = rows["cpu-1node-bf16"] = run_one(model_dir, prompt_ids, n, ["cpu"], ["bf16"])
        say(f"cpu bf16: {r['decode_tok_s']} tok/s")
    if time_left() > (40 if big else 15):
        entry["memory"] = mem = [peak_memory(model_dir, prompt_ids, n, device, "fp32", w) for w in (2, None)]
        for m in mem:
            if m["peak_device_bytes"] is not None:
                say(
                    f"peak device memory, window {m['window']}: {m['peak_device_bytes'] / 2**20:.1f} MiB, "
                    f"{m['decode_tok_s']} tok/s"
                )
    else:
        skipped.append("memory")
    entry["ok"] = ok
    return ok


def speed_plan(device: str, model_dir: Path, results: dict) -> None:
    """The speed-weighted plan a DEVICE node and a cpu node would get (capacity = measured speed)."""
    cfg = ModelConfig.from_dir(model_dir)
    dev_info, cpu_info = select_device(device), select_device("cpu")
    caps = [device_capacity("gpu-node", dev_info, dtype="fp32"), device_capacity("cpu-node", cpu_info)]
    caps_bf16 = [device_capacity("gpu-node", dev_info, dtype="bf16" if dev_info.kind != "cpu" else "fp32"), caps[1]]
    for label, cs in (("fp32", caps), ("device-default-dtype", caps_bf16)):
        plan = make_plan(cfg, cs)
        shares = [
            {"node": s.node_id, "kv_heads": s.n_kv, "ffn_cols": s.n_ffn, "speed_gflops": round(c.speed, 1)}
            for s, c in zip(plan.shares, cs)
        ]
        results["speed_plan"][label] = shares
        print(f"speed-weighted plan ({label}) for {model_dir.name}: {shares}", flush=True)


def make_models(names: list[str], root: Path) -> dict[str, Path]:
    from tpi_node.weights.synth import synthesize

    out = {}
    for name in names:
        if name in SYNTH:
            preset, layers = SYNTH[name]
            t0 = time.perf_counter()
            out[name] = synthesize(preset, root / name, layers=layers, seed=0, progress=False)
            print(f"[{name}] synthesized {preset} in {time.perf_counter() - t0:.1f} s", flush=True)
        elif Path(name).is_dir():
            out[Path(name).name] = Path(name)
        else:
            raise SystemExit(f"unknown model {name!r}: {', '.join(SYNTH)} or a model directory")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="tiny,random-0.5b", help="comma list: tiny, random-0.5b, or directories")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the results as JSON here (worker logs next to it)")
    ap.add_argument("--workdir", default=None, help="where synthesized models and shards go (default: a temp dir)")
    ap.add_argument(
        "--deadline",
        type=float,
        default=float("inf"),
        help="seconds after which the optional runs left are skipped (default: none)",
    )
    args = ap.parse_args()

    DEADLINE[0] = args.deadline
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 for the equality check
    torch.backends.cudnn.allow_tf32 = False
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tpi-device-check-"))
    os.environ["TPI_HOME"] = str(work / "home")  # shards of this run only (the workers inherit it)
    log_dir = Path(args.out).parent / "workers" if args.out else work / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    info = select_device(args.device)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info.as_dict(),
        "cpu": select_device("cpu").as_dict(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "speed_gflops": {},
        "speed_plan": {},
        "models": {},
    }

    def save() -> None:  # after every model: a run cut short still leaves what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")

    import google.protobuf
    import grpc

    print(
        f"device: {info.summary()}; cpu: {results['cpu']['summary']}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} cpu threads; grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}",
        flush=True,
    )
    for d, dt in ((str(info.device), "fp32"), (str(info.device), "bf16"), ("cpu", "fp32"), ("cpu", "bf16")):
        results["speed_gflops"][f"{d}/{dt}"] = round(measure_speed(d, dt), 1)
    print(f"measured speed (GFLOP/s of a [16,1024]x[1024,4096] product): {results['speed_gflops']}", flush=True)
    if info.kind == "cuda":
        sdpa_probe(str(info.device), results)
    models = make_models([m for m in args.models.split(",") if m], work / "models")
    ok = True
    for i, (name, d) in enumerate(models.items()):
        ok &= check_model(name, d, str(info.device), args.tokens, results, log_dir, probe_bf16=i < 2)
        synchronize(info.device)
        save()
    speed_plan(str(info.device), list(models.values())[-1], results)
    results["ok"] = ok
    save()
    print(f"RESULT: {'PASS' if ok else 'FAIL'} in {time.monotonic() - T0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
