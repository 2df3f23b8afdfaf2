#!/usr/bin/env python3
"""Device check (issue 9): the same greedy text on a CUDA node, a CPU node and mixed clusters.

For each model (made here from a seed, or a directory):
  1. reference: one node on cpu, fp32, greedy, N tokens;
  2. one node on DEVICE, fp32 (TF32 off): token ids must equal the reference;
  3. 2 nodes in one process: rank 0 (master) on DEVICE, rank 1 on cpu, fp32; partials go
     device -> pinned host -> sum -> device (DeviceHop over InProcessGroup): must equal;
  4. 3 nodes: master on cpu, rank 1 on DEVICE, rank 2 on cpu (the issue's mixed cluster): must equal;
  5. one node on DEVICE in bf16: decode tokens/s (text compared, reported, not required);
  6. decode tokens/s of the DEVICE node vs the cpu node; the plan a speed-weighted split gives;
  7. peak device memory with a window of W=2 layers vs all layers resident.
The multi-node runs here use an even split (speed-weighted, a GPU would take nearly all of the
work and the CPU ranks would compute nothing to compare); the speed-weighted plan is printed.

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
from tpi_node.engine.device import (device_capacity, measure_speed, select_device,  # noqa: E402
                                    synchronize)
from tpi_node.engine.engine import Engine  # noqa: E402
from tpi_node.engine.head import ModelHead  # noqa: E402
from tpi_node.engine.node import LocalDriver, open_runner  # noqa: E402
from tpi_node.model.config import ModelConfig  # noqa: E402
from tpi_node.model.sampling_params import SamplingParams  # noqa: E402
from tpi_node.model.tokenizer import Tokenizer  # noqa: E402
from tpi_node.weights.checkpoint import model_digest  # noqa: E402
from tpi_node.weights.plan import NodeCapacity, make_plan  # noqa: E402
from tpi_node.weights.slicer import DTYPES  # noqa: E402

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
            runner.coll.close()          # breaks the group's barrier: the other ranks stop waiting
            raise

    def step(self, layout, x):
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
        return h

    def free(self, seq_ids) -> None:
        for r in self.runners:
            r.free(seq_ids)

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


def open_engine(model_dir: Path, devices: list[str], dtypes: list[str], window: int | None = None,
                plan_speeds: list[float] | None = None) -> Engine:
    """An engine over len(devices) ranks in this process; rank 0 is the master (embedding + head)."""
    cfg = ModelConfig.from_dir(model_dir)
    caps = [NodeCapacity(f"node{i}" if len(devices) > 1 else "local", 1 << 40, 1,
                         speed=plan_speeds[i] if plan_speeds else None) for i in range(len(devices))]
    plan = make_plan(cfg, caps, model_digest(model_dir))
    if len(devices) == 1:
        colls = [LocalCollective()]
    else:
        group = InProcessGroup(len(devices))
        colls = [DeviceHop(group.member(i), wire_dtype=torch.float32) for i in range(len(devices))]
    runners = [open_runner(model_dir, cfg, plan, i, colls[i], dtypes[i], window, device=devices[i], progress=False)
               for i in range(len(devices))]
    driver = LocalDriver(runners[0]) if len(runners) == 1 else GroupDriver(runners)
    head = ModelHead(model_dir, cfg, DTYPES[dtypes[0]], device=devices[0])
    return Engine(cfg, head, Tokenizer.from_dir(model_dir), driver, model_dir.name)


def generate(engine: Engine, prompt_ids: list[int], n: int) -> dict:
    """Greedy n tokens (EOS ignored): ids, text, decode tokens/s (after the first token)."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    list(engine.generate_sync(prompt_ids, SamplingParams(max_tokens=2, temperature=0)))   # warm-up
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
    return {"window": window or "resident", "peak_device_bytes": torch.cuda.max_memory_allocated(dev) - base,
            "decode_tok_s": r["decode_tok_s"]}


def check_model(name: str, model_dir: Path, device: str, n: int, results: dict) -> bool:
    tok = Tokenizer.from_dir(model_dir)
    prompt_ids = tok.encode(PROMPT)
    cfg = ModelConfig.from_dir(model_dir)
    rows, ok = {}, True
    say = lambda m: print(f"[{name}] {m}", flush=True)  # noqa: E731
    say(f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_kv_heads} kv heads, "
        f"{len(prompt_ids)} prompt tokens, {n} new")
    rows["cpu-1node-fp32"] = ref = run_one(model_dir, prompt_ids, n, ["cpu"], ["fp32"])
    say(f"reference cpu fp32: {ref['decode_tok_s']} tok/s  text={ref['text']!r}")
    runs = {
        f"{device}-1node-fp32": ([device], ["fp32"]),
        f"{device}+cpu-2node-fp32": ([device, "cpu"], ["fp32", "fp32"]),
        f"cpu+{device}+cpu-3node-fp32": (["cpu", device, "cpu"], ["fp32"] * 3),
    }
    for key, (devs, dts) in runs.items():
        try:
            r = rows[key] = run_one(model_dir, prompt_ids, n, devs, dts)
        except Exception as e:       # recorded as a failure; the other runs still measure
            r = rows[key] = {"error": f"{type(e).__name__}: {e}", "ids": None, "text": "", "decode_tok_s": 0.0}
            say(f"{key}: FAILED {r['error']}")
        r["equal_to_reference"] = r["ids"] == ref["ids"]
        ok &= r["equal_to_reference"]
        say(f"{key}: {'EQUAL' if r['equal_to_reference'] else 'DIFFERENT'}  {r['decode_tok_s']} tok/s"
            + ("" if r["equal_to_reference"] else f"  text={r['text']!r}"))
    if torch.device(device).type != "cpu":
        r = rows[f"{device}-1node-bf16"] = run_one(model_dir, prompt_ids, n, [device], ["bf16"])
        r["equal_to_reference"] = r["ids"] == ref["ids"]        # informational: bf16 rounds differently
        same = sum(a == b for a, b in zip(r["ids"], ref["ids"]))
        say(f"{device} bf16: {r['decode_tok_s']} tok/s, {same}/{n} tokens as fp32 cpu")
    if cfg.num_layers * cfg.hidden_size * cfg.intermediate_size * 3 < 300e6:   # bf16 on a CPU can be slow
        r = rows["cpu-1node-bf16"] = run_one(model_dir, prompt_ids, n, ["cpu"], ["bf16"])
        say(f"cpu bf16: {r['decode_tok_s']} tok/s")
    mem = [peak_memory(model_dir, prompt_ids, n, device, "fp32", w) for w in (2, None)]
    for m in mem:
        if m["peak_device_bytes"] is not None:
            say(f"peak device memory, window {m['window']}: {m['peak_device_bytes'] / 2**20:.1f} MiB")
    results["models"][name] = {"dir": str(model_dir), "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                               "runs": rows, "memory": mem, "ok": ok}
    return ok


def speed_plan(device: str, model_dir: Path, results: dict) -> None:
    """The speed-weighted plan a DEVICE node and a cpu node would get (capacity = measured speed)."""
    cfg = ModelConfig.from_dir(model_dir)
    dev_info, cpu_info = select_device(device), select_device("cpu")
    caps = [device_capacity("gpu-node", dev_info, dtype="fp32"), device_capacity("cpu-node", cpu_info)]
    caps_bf16 = [device_capacity("gpu-node", dev_info, dtype="bf16" if dev_info.kind != "cpu" else "fp32"), caps[1]]
    for label, cs in (("fp32", caps), ("device-default-dtype", caps_bf16)):
        plan = make_plan(cfg, cs)
        shares = [{"node": s.node_id, "kv_heads": s.n_kv, "ffn_cols": s.n_ffn, "speed_gflops": round(c.speed, 1)}
                  for s, c in zip(plan.shares, cs)]
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
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--workdir", default=None, help="where synthesized models and shards go (default: a temp dir)")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 must mean fp32 for the equality check
    torch.backends.cudnn.allow_tf32 = False
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tpi-device-check-"))
    os.environ["TPI_HOME"] = str(work / "home")          # shards of this run only
    info = select_device(args.device)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": info.as_dict(), "cpu": select_device("cpu").as_dict(), "torch": torch.__version__,
               "python": platform.python_version(), "threads": torch.get_num_threads(),
               "speed_gflops": {}, "speed_plan": {}, "models": {}}
    print(f"device: {info.summary()}; cpu: {results['cpu']['summary']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} cpu threads", flush=True)
    for d, dt in ((str(info.device), "fp32"), (str(info.device), "bf16"), ("cpu", "fp32"), ("cpu", "bf16")):
        results["speed_gflops"][f"{d}/{dt}"] = round(measure_speed(d, dt), 1)
    print(f"measured speed (GFLOP/s of a [16,1024]x[1024,4096] product): {results['speed_gflops']}", flush=True)
    models = make_models([m for m in args.models.split(",") if m], work / "models")
    ok = True
    for name, d in models.items():
        ok &= check_model(name, d, str(info.device), args.tokens, results)
        synchronize(info.device)
        if args.out:          # after every model: a run cut short still leaves what it measured
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    speed_plan(str(info.device), list(models.values())[-1], results)
    results["ok"] = ok
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("RESULT:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
