"""One generation through the single-node engine, as a separate process (for tests/test_cgroup.py
and the benchmarks): prints one JSON line with the token ids, the text and the node's counters.

    python -m tests.stream_runner MODEL_DIR --prompt TEXT --max-tokens N [--memory-budget SIZE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tpi_node.commands.compose import build_local_engine
from tpi_node.errors import UserError
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.settings import size


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--memory-budget", type=size, default=None)  # the CLI's own converter
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        engine = build_local_engine(
            a.model, dtype=a.dtype, window=a.window, memory_budget=a.memory_budget, progress=False
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = engine.tokenizer.encode(a.prompt)
    t0, times, events = time.perf_counter(), [], []
    for ev in engine.generate_sync(ids, SamplingParams(max_tokens=a.max_tokens, temperature=0.0)):
        times.append(time.perf_counter() - t0)
        events.append(ev)
    stats = engine.driver.stats()["local"]
    engine.shutdown()
    n = len(events)
    print(
        json.dumps(
            {
                "ids": [e.token_id for e in events],
                "text": "".join(e.text for e in events),
                "ttft_s": times[0] if times else None,
                "s_per_token": (times[-1] - times[0]) / (n - 1) if n > 1 else None,
                "stats": stats,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
