"""The disk (issue 18): rank 0 reads the checkpoint in place (a one-node run writes no shard
copy), and a worker whose shard cache is on a full disk says so clearly and leaves nothing
half-written behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cluster_procs import REPO, Node, free_port, wait_health
from tpi_node.comm.collective import LocalCollective
from tpi_node.engine.runner import open_runner
from tpi_node.model.config import ModelConfig
from tpi_node.model.quant import QMatrix
from tpi_node.units import format_size
from tpi_node.weights.plan import NodeCapacity, make_plan
from tpi_node.weights.shard_file import read_safetensors
from tpi_node.weights.slicer import layer_file, shard_files, write_node_shards
from tpi_node.weights.source import CheckpointSlices, in_place
from tpi_node.weights.store import ShardStore

try:
    import httpx
except ImportError:  # newer openai releases ship httpx as httpx2
    import httpx2 as httpx


# ---- rank 0 reads in place ---------------------------------------------------------------------
def test_a_one_node_run_writes_no_shard_copy(tmp_path, smollm2_dir):
    """`generate` streaming through a window (the budget is too small to keep every layer) reads
    its layers from the GGUF on every load: the shard cache stays empty, the text is the resident
    run's, and the process exits cleanly with its prefetcher mid-load (it once aborted: 134)."""
    env = {**os.environ, "TPI_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tpi_node.cli", "generate", "--model", str(smollm2_dir), "--max-tokens", "12"]
    cmd += ["--prompt", "The capital of France is"]
    streamed = subprocess.run([*cmd, "--memory-budget", "620MiB"], capture_output=True, text=True, env=env, timeout=120)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    window = int(re.search(r" window=(\d+) ", streamed.stderr).group(1))
    assert 2 <= window < 30  # it did stream (30 layers)
    resident = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert resident.returncode == 0, resident.stderr[-3000:]
    assert streamed.stdout == resident.stdout and streamed.stdout.strip()
    assert not (tmp_path / "shards").exists(), sorted(p.name for p in (tmp_path / "shards").rglob("*"))


@pytest.mark.parametrize("model,dtype", [("tiny", "fp32"), ("tiny", "bf16"), ("smollm2", "fp32"), ("kquant", "fp32")])
def test_in_place_slices_are_the_shard_files(tmp_path, tiny_model_dir, smollm2_dir, monkeypatch, model, dtype):
    """Every layer read from the checkpoint (resident, and streamed through slots) holds exactly
    the bytes of the shard file a worker would get: --dtype cast, a GGUF's blocks and its
    permuted q / k rows included, and a K-quant GGUF's rows repacked (each rank only its own)."""
    monkeypatch.setenv("TPI_PREPACK", "0")  # resident weights as read, to compare bytes
    if model == "kquant":
        from tests.gguf_util import write_k_quant_llama

        (tmp_path / "kquant").mkdir()
        d = write_k_quant_llama(tmp_path / "kquant")
    else:
        d = tiny_model_dir("tiny-llama") if model == "tiny" else smollm2_dir
    cfg = ModelConfig.from_dir(d)
    two = make_plan(cfg, [NodeCapacity("a", 0), NodeCapacity("b", 0)])
    for plan, rank, window in [(two, 0, None), (two, 1, 2), (make_plan(cfg, [NodeCapacity("a", 0)]), 0, 2)]:
        share, out = plan.share_of(rank), tmp_path / f"{plan.digest[:8]}-{rank}"
        write_node_shards(d, cfg, plan, rank, out, dtype, progress=False)
        store = ShardStore(CheckpointSlices(d, cfg, share, dtype, "none"), cfg, share, window=window)
        assert store.streaming == (window is not None)
        for i in [*range(cfg.num_layers), 0]:
            want, _ = read_safetensors(out / layer_file(i))
            with store.layer(i) as w:
                for name, t in want.items():
                    got = getattr(w, name)
                    got = got.data if isinstance(got, QMatrix) else got
                    assert got.dtype == t.dtype and torch.equal(got, t), (rank, window, i, name)
        norms, _ = read_safetensors(out / "norms.safetensors")
        assert torch.equal(store.norms.final, norms["final"]) and torch.equal(store.norms.post[1], norms["post.1"])
        store.close()


def test_quantising_float_weights_keeps_a_quantised_copy(tmp_path, tiny_model_dir, smollm2_dir, monkeypatch):
    """--quant of float weights is the one case sliced into the cache (quantising on every
    start or load would cost ~10x a read); a GGUF's blocks stay in place under --quant too."""
    monkeypatch.setenv("TPI_HOME", str(tmp_path))
    assert in_place(smollm2_dir, "int4") and in_place(smollm2_dir, "none")
    d = tiny_model_dir("tiny-llama")
    assert in_place(d, "none") and not in_place(d, "int4")
    cfg = ModelConfig.from_dir(d)
    plan = make_plan(cfg, [NodeCapacity("a", 0)])
    runner = open_runner(d, cfg, plan, 0, LocalCollective(), progress=False, kv_blocks=4, quant="int4")
    assert runner.store.source is None  # it reads a folder of shard files: the quantised slices
    assert len(list((tmp_path / "shards").rglob("layer-*.safetensors"))) == cfg.num_layers
    runner.close()


# ---- a full disk under a worker's shard cache ---------------------------------------------------
PAGE = 4096  # tmpfs counts whole pages: every file's last page is partly unused


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (mounted as root; skipped where mounting is not permitted)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}); needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_worker_on_a_full_disk_says_so_and_a_later_join_succeeds(tmp_path, smollm2_dir, small_disk):
    """1: a cache too small for the slice is refused before anything is fetched; 2: a disk that
    fills while fetching (room for the slice's bytes but not for the page rounding of its last
    files) loses only the file being written; both times the worker exits with one clear line and
    the master logs it; 3: with room, the same worker joins, keeps its complete files, serves."""
    http, grpc_port = free_port(), free_port()
    serve = ["serve", "--model", str(smollm2_dir), "--port", str(http), "--grpc-port", str(grpc_port)]
    master = Node("master", tmp_path, [*serve, "--min-nodes", "2", "--speed", "1"])
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "shards").symlink_to(small_disk)  # the worker's shard cache
    join = ["join", "--master", f"127.0.0.1:{grpc_port}", "--node-id", "w1", "--speed", "1"]
    worker = Node("worker", tmp_path, join)
    names = set(shard_files(ModelConfig.from_dir(smollm2_dir)))
    try:
        line = _disk_full_exit(worker, tmp_path)
        assert "(31 files to fetch) needs 32.12 MiB" in line and "3.99 MiB free" in line, line
        assert not _cached(small_disk, names), "nothing was fetched"
        _wait_for(master, "w1 (rank 1) left: reported an error: disk full: rank 1's slice (31 files")

        # 2: room for the slice's bytes (what the worker checks) but not for its pages
        want = {p.name: p.read_bytes() for p in (tmp_path / "master" / "shards").rglob("*") if p.name in names}
        need = sum(len(b) for b in want.values())
        used = _used(small_disk)  # what the worker wrote before it checked (config.json, ...)
        _resize(small_disk, used + -(-need // PAGE) * PAGE + 2 * PAGE)
        worker.stop()
        worker.start()
        line = _disk_full_exit(worker, tmp_path)
        kept = _cached(small_disk, names)
        missing = need - sum(len(want[n]) for n in kept)
        assert 20 < len(kept) < len(names) and f"slice needs {format_size(missing)} in" in line, line
        for path in small_disk.rglob("*"):  # nothing half-written: every file left is whole
            assert not path.name.endswith(".part"), path
            assert path.name not in names or path.read_bytes() == want[path.name], path
        said = f"w1 (rank 1) left: reported an error: disk full: rank 1's slice needs {format_size(missing)}"
        _wait_for(master, said)

        # 3: room: the same worker joins again, keeps what it has, and the cluster serves
        _resize(small_disk, 64 << 20)
        worker.stop()
        worker.start()
        _wait_for(worker, "ready; serving steps", timeout=120)
        assert f"; {len(kept)} files already cached" in worker.log()
        wait_health(f"http://127.0.0.1:{http}", 2, 60, [master, worker])
        r = httpx.post(
            f"http://127.0.0.1:{http}/v1/completions",
            json={"model": smollm2_dir.name, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        # the master's own slice is read in place: its cache holds the worker's slice set only
        sets = {h: {p.name for p in (tmp_path / h / "shards").glob("*/*/*") if p.is_dir()} for h in NODES}
        assert len(sets["master"]) == 1 and sets["master"] == sets["worker"], sets
    finally:
        worker.stop()
        master.stop()


NODES = ("master", "worker")


def _disk_full_exit(worker: Node, tmp_path: Path) -> str:
    """The worker exits non-zero with one `disk full` line naming its cache folder -> that line."""
    rc = worker.wait_exit(90)
    log = worker.log().split("joining ")[-1]  # this run's part of the log
    assert rc != 0 and "error: disk full: rank 1's slice" in log, log[-3000:]
    line = next(x for x in log.splitlines() if "error: disk full:" in x)
    assert f" in {tmp_path / 'worker' / 'shards'}/" in line and "set TPI_HOME" in line, line
    return line


def _cached(disk: Path, names: set[str]) -> set[str]:
    return {p.name for p in disk.rglob("*") if p.name in names}


def _used(disk: Path) -> int:
    st = os.statvfs(disk)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _resize(disk: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def _wait_for(node: Node, text: str, timeout: float = 30, count: int = 1) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = node.log()
        if log.count(text) >= count:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{node.name} never logged {text!r} {count} time(s):\n{node.log()[-3000:]}")
