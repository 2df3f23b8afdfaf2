"""A node inside a real memory cgroup serves a model whose slices are 3x+ the limit.

The model: 16 llama layers of ~118 MB (fp32; hidden 1024, FFN 8192) = ~1.9 GB of slices, a tiny
vocabulary so that the head is small. The limit is the memory budget that gives W = 2 (the
budget arithmetic of tpi_node/engine/budget.py: window + KV cache + activations + head + the
python/torch runtime). The single-node engine (`build_local_engine(..., memory_budget=...)`, the code behind
`tpi-node generate --memory-budget`; tests/stream_runner.py prints its token ids) runs inside the cgroup with the page
cache dropped first, so every layer it reads comes from disk and its page cache is charged to
the cgroup too; its text must equal the unlimited run's. A control run without a budget in the
same cgroup must be killed by the OOM killer: that proves the limit bites.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cgroup_util import CgroupUnavailable, MemoryCgroup, drop_page_cache, peak_text
from tpi_node.engine.budget import estimate
from tpi_node.model import presets
from tpi_node.model.config import ModelConfig
from tpi_node.units import format_size
from tpi_node.weights.plan import NodeCapacity, make_plan
from tpi_node.weights.synth import synthesize

BIG_LAYERS = presets._llama(1024, 8192, 20, 8, 8, 261, max_pos=128)  # vocab: specials + 256 bytes
PROMPT = "The quick brown fox"
MAX_TOKENS = 4


def _generate(argv_prefix: list[str], model: Path, env: dict, budget: str | None = None, timeout: int = 120):
    """The single-node engine in its own process (tests/stream_runner.py): (returncode, result, stderr)."""
    argv = [
        sys.executable,
        "-m",
        "tests.stream_runner",
        str(model),
        "--prompt",
        PROMPT,
        "--max-tokens",
        str(MAX_TOKENS),
    ]
    if budget:
        argv += ["--memory-budget", budget]
    r = subprocess.run(
        argv_prefix + argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )
    out = json.loads(r.stdout.splitlines()[-1]) if r.returncode == 0 else None
    return r.returncode, out, r.stderr


def test_w2_generation_inside_a_memory_cgroup_matches_the_unlimited_run(tmp_path):
    presets.PRESETS["cgroup-big-layers"] = BIG_LAYERS
    try:
        model = synthesize("cgroup-big-layers", tmp_path / "model", progress=False)
    finally:
        presets.PRESETS.pop("cgroup-big-layers", None)
    cfg = ModelConfig.from_dir(model)
    share = make_plan(cfg, [NodeCapacity("local", 0, cores=1)]).share_of(0)
    est = estimate(cfg, share, "fp32", is_master=True)
    limit = est.total(2)  # the budget that gives exactly W = 2
    env = {**os.environ, "TPI_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    # Unlimited and resident.
    t = time.perf_counter()
    rc, free, err = _generate([], model, env)
    t_free = time.perf_counter() - t
    assert rc == 0, err[-2000:]
    assert free["stats"]["window"] == cfg.num_layers and len(free["ids"]) == MAX_TOKENS
    slices = share.layer_params(cfg) * cfg.num_layers * 4  # fp32, read from the checkpoint in place
    assert slices >= 3 * limit, (format_size(slices), format_size(limit))

    try:
        cg = MemoryCgroup(limit, "tpi-stream-test")
    except CgroupUnavailable as e:
        pytest.skip(str(e))
    with cg:
        t = time.perf_counter()
        dropped = drop_page_cache()  # every layer is read from disk, charged to the cgroup
        t = time.perf_counter()
        rc, streamed, err = _generate(cg.command([]), model, env, budget=str(limit))
        peak_cgroup = cg.peak_bytes()
        t_streamed = time.perf_counter() - t
        assert rc == 0, f"rc {rc}, oom kills {cg.oom_kills()}: {err[-2000:]}"
        stats = streamed["stats"]
        assert stats["window"] == 2
        assert streamed["ids"] == free["ids"] and streamed["text"] == free["text"]
        peak_rss = stats["peak_rss_bytes"]
        # The kernel kept the cgroup (anonymous memory and page cache it was charged) under the
        # limit; RSS also counts shared libraries paged in (and charged) outside the cgroup, so it
        # is compared with the model instead: far below its slices, i.e. really streamed.
        if peak_cgroup is not None:  # None: this kernel keeps no peak (the print says so)
            assert peak_cgroup <= limit
        assert peak_rss < slices / 2, (format_size(peak_rss), format_size(slices))
        # every step streamed every layer (a step may check speculative drafts: steps <= tokens)
        assert 1 < stats["steps"] <= MAX_TOKENS
        assert stats["bytes_read"] >= stats["steps"] * slices * 0.9
        print(
            f"\ncgroup v{cg.version} limit {format_size(limit)}, slices {format_size(slices)} "
            f"({slices / limit:.1f}x), peak rss {format_size(peak_rss)}, cgroup peak {peak_text(peak_cgroup)} "
            f"(page cache included), page cache dropped: {dropped}; "
            f"{t_free:.1f} s unlimited, {t_streamed:.1f} s streamed"
        )

        # Control: the same generation without a budget (every layer resident) cannot fit.
        cg.reset_peak()
        t = time.perf_counter()
        rc, _, err = _generate(cg.command([]), model, env)
        t_control = time.perf_counter() - t
        assert rc in (-9, 137), f"rc {rc}: the limit did not bite: {err[-1000:]}"
        assert cg.oom_kills() >= 1
        print(f"control without a budget: OOM-killed after {t_control:.1f} s")
