#!/usr/bin/env python3
"""oneDNN prepacking on this CPU: one-node decode with every float weight prepacked
(TPI_PREPACK=1, what every node did before the choice was measured), as measured at start
(auto, the default: model/layers.py prepack_pays) and never (TPI_PREPACK=0), side by side, each
in its own process, interleaved rounds, best of --repeats.

    .venv/bin/python scripts/bench_prepack.py --synth llama3.2-1b [--layers 4] [--tokens 16] [--repeats 2]
    .venv/bin/python scripts/bench_prepack.py --model DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODES = ("1", "auto", "0")


def child(model: str, tokens: int, threads: int) -> None:
    """One run in this process: -> JSON {decode_ms, ttft_ms} on stdout."""
    import torch

    from tpi_node.commands.compose import build_local_engine
    from tpi_node.model.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    engine = build_local_engine(model, progress=False, speculative="off")
    ids, params = list(range(100, 132)), SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    list(engine.generate_sync(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))  # warm up
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.generate_sync(ids, params)]
    engine.shutdown()
    ms = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3
    print(json.dumps({"decode_ms": ms, "ttft_ms": (stamps[0] - t0) * 1e3}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model directory (fp32 or bf16 weights)")
    ap.add_argument("--synth", metavar="PRESET", help="a synthetic checkpoint of this shape instead")
    ap.add_argument("--layers", type=int, default=4, help="layers of the synthetic checkpoint")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tpi-bench-prepack"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.model, a.tokens, a.threads)
    model = a.model
    if a.synth:
        model = str(a.work / f"{a.synth}-{a.layers}")
        if not (Path(model) / "config.json").is_file():
            cmd = ["synth", "--preset", a.synth, "--out", model, "--layers", str(a.layers)]
            subprocess.run([sys.executable, "-m", "tpi_node.cli", *cmd], check=True)
    best: dict[str, dict] = {}
    for _ in range(a.repeats):
        for mode in MODES:
            env = {**os.environ, "TPI_PREPACK": mode}
            cmd = [sys.executable, __file__, "--child", "--model", model, "--tokens", str(a.tokens)]
            out = subprocess.run(cmd + ["--threads", str(a.threads)], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            said = [line for line in out.stderr.splitlines() if "prepacked weights" in line]
            if mode == "auto" and said:
                print("auto said:", *said, sep="\n  ")
            if mode not in best or r["decode_ms"] < best[mode]["decode_ms"]:
                best[mode] = r
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()}, {os.cpu_count()} cores, {a.synth or model}, "
        f"{a.threads} threads"
    )
    print(f"{'TPI_PREPACK':>11} | {'decode ms/token':>15} {'vs always':>9} | {'TTFT ms':>8}")
    for mode in MODES:
        r = best[mode]
        print(
            f"{mode:>11} | {r['decode_ms']:>15.1f} {r['decode_ms'] / best['1']['decode_ms']:>8.2f}x | "
            f"{r['ttft_ms']:>8.0f}"
        )


if __name__ == "__main__":
    main()
