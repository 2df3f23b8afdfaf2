"""Sliding-window weight streaming: same tokens as resident, bounded memory, honest counters,
and the memory budget arithmetic (tpi_node/engine/budget.py)."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.hf_util import OurModel
from tpi_node.engine.budget import UNBUDGETED_KV_TOKENS, estimate, plan_memory
from tpi_node.engine.limits import BLOCK_TOKENS
from tpi_node.errors import UserError
from tpi_node.model import presets
from tpi_node.model.config import ModelConfig
from tpi_node.units import format_size, parse_size
from tpi_node.weights.counters import request_line, snapshot
from tpi_node.weights.plan import NodeCapacity, PlanError, make_plan
from tpi_node.weights.slicer import layer_file, write_node_shards
from tpi_node.weights.source import CheckpointSlices
from tpi_node.weights.store import ShardError, ShardStore, rss_bytes
from tpi_node.weights.synth import synthesize

# 6 layers of ~29 MB (fp32): big enough that RSS shows whether a released layer really went back
# to the operating system, small enough to synthesize in a second or two.
MEDIUM = presets._llama(512, 4096, 6, 8, 4, 512, max_pos=2048)
PROMPT = [1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    presets.PRESETS["stream-medium"] = MEDIUM
    try:
        return synthesize("stream-medium", tmp_path_factory.mktemp("medium"), progress=False)
    finally:
        presets.PRESETS.pop("stream-medium", None)


@pytest.fixture(autouse=True)
def _tpi_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TPI_HOME", str(tmp_path_factory.getbasetemp() / "tpi-home"))


def _layer_files_bytes(model: OurModel) -> int:
    """Bytes of one pass over the layers (rank 0 reads them from the checkpoint in place)."""
    src = model.runner.store.source
    return sum(src.data_size(layer_file(i)) for i in range(model.cfg.num_layers))


def test_streaming_w2_gives_the_resident_tokens_and_counts_its_reads(medium_model):
    resident = OurModel(medium_model)
    want = resident.greedy(PROMPT, 8)
    r_stats = resident.runner.store.stats
    read_once = r_stats.bytes_read
    resident.greedy(PROMPT, 3, seq_id=2)
    assert r_stats.bytes_read == read_once and r_stats.layers_loaded == resident.cfg.num_layers
    resident.runner.close()

    streamed = OurModel(medium_model, window=2)
    store = streamed.runner.store
    assert store.streaming and store.window == 2
    assert streamed.greedy(PROMPT, 8) == want

    # Every further step streams every layer file once: bytes_read grows by exactly their sum.
    per_pass = _layer_files_bytes(streamed)
    logits = streamed.step(3, 0, PROMPT)
    token = int(logits[-1].argmax())
    for n in range(3):
        store.settle()
        before = snapshot({"local": store.stats.as_dict()})
        streamed.step(3, len(PROMPT) + n, [token])
        store.settle()
        after = snapshot({"local": store.stats.as_dict()})
        delta = after["local"].minus(before["local"])
        assert per_pass - 64 * 1024 < delta.bytes_read <= per_pass + 64 * 1024
        assert delta.layers_loaded == streamed.cfg.num_layers
        assert 0.0 <= delta.stall_s <= streamed.runner.stats.wall_s
        assert delta.load_s > 0.0
    line = request_line("r1", before, after)
    assert "read" in line and "stall" in line and "peak rss" in line
    assert after["local"].peak_rss_bytes >= rss_bytes() // 2
    streamed.runner.close()


# A store over shard files (a worker's) reads each layer into its slot (measured: 2.0 layers above
# base); one over the checkpoint (rank 0, in place) copies it there from the mapped file, whose
# pages it holds until the copy is done (measured: 2.5 layers).
@pytest.mark.parametrize("source", ["files", "in place"])
def test_streaming_rss_stays_within_the_window(medium_model, tmp_path, source):
    """Walk the layers like the forward pass; RSS never holds much more than W layers."""
    cfg = ModelConfig.from_dir(medium_model)
    plan, L = make_plan(cfg, [NodeCapacity("n", 0)]), cfg.num_layers
    src = CheckpointSlices(medium_model, cfg, plan.share_of(0), "fp32", "none")
    layer_bytes = src.data_size(layer_file(0))
    if source == "files":
        write_node_shards(medium_model, cfg, plan, 0, tmp_path, progress=False)
        src = tmp_path
    store = ShardStore(src, cfg, plan.share_of(0), window=2)
    store.settle()
    gc.collect()
    base = rss_bytes() - 2 * layer_bytes  # what is not the two prefetched layers
    high = 0
    for _ in range(3):
        for i in range(L):
            with store.layer(i) as w:
                assert store.in_memory() <= 2
                torch.mv(w.w13, torch.ones(w.w13.shape[1]))  # touch the weights
                high = max(high, rss_bytes())
            del w
    # W layers plus at most one layer's worth of slack; a store that leaked released layers would
    # be at 6 layers + after three passes.
    assert high - base < 3.5 * layer_bytes, (format_size(high - base), format_size(layer_bytes))
    store.close()


def test_out_of_order_access_restarts_the_window_with_the_right_weights(medium_model, monkeypatch):
    monkeypatch.setenv("TPI_PREPACK", "0")  # the resident copy as read, to compare bytes
    m = OurModel(medium_model)
    res = m.runner.store
    st = ShardStore(CheckpointSlices(medium_model, m.cfg, res.share, "fp32", "none"), m.cfg, res.share, window=2)
    for i in [0, 1, 4, 5, 0, 3, 3, 2, 5, 1]:
        with st.layer(i) as w, res.layer(i) as r:
            assert torch.equal(w.w2, r.w2) and torch.equal(w.wqkv, r.wqkv)
    assert st.stats.restarts >= 3
    st.close()
    m.runner.close()


def test_a_corrupt_layer_file_fails_the_forward_pass_instead_of_hanging(medium_model, tmp_path):
    m = OurModel(medium_model)
    plan = make_plan(m.cfg, [NodeCapacity("n", 0)])
    write_node_shards(medium_model, m.cfg, plan, 0, tmp_path, progress=False)
    good = (tmp_path / layer_file(3)).read_bytes()
    (tmp_path / layer_file(3)).write_bytes(good[: len(good) // 2])  # data cut short
    st = ShardStore(tmp_path, m.cfg, m.runner.store.share, window=2)
    with pytest.raises(ShardError, match="loading layer 3 failed: .*truncated"):
        for i in range(m.cfg.num_layers):
            with st.layer(i):
                pass
    st.close()
    (tmp_path / layer_file(3)).write_bytes(b"\x05")  # header gone: refused at open
    with pytest.raises(ShardError, match="layer-003.safetensors: truncated"):
        ShardStore(tmp_path, m.cfg, m.runner.store.share, window=2)
    m.runner.close()


# ---- budget -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,want",
    [
        ("2GiB", 2 * 2**30),
        ("500M", 500 * 2**20),
        ("500m", 500 * 2**20),
        ("8GB", 8 * 10**9),
        ("1.5G", int(1.5 * 2**30)),
        ("4096", 4096),
        (" 64 MiB ", 64 * 2**20),
        ("10kb", 10_000),
    ],
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "two gigs", "5XB", "-1G", "0", "1e9"])
def test_parse_size_rejects_nonsense_in_one_line(bad):
    with pytest.raises(UserError, match="memory size") as e:
        parse_size(bad)
    assert "\n" not in str(e.value)


def _cfg_70b(tmp_path, nodes: int):
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    import json

    (d / "config.json").write_text(json.dumps(presets.get_preset("llama2-70b")))
    cfg = ModelConfig.from_dir(d)
    plan = make_plan(cfg, [NodeCapacity(f"n{i}", 0, cores=1) for i in range(nodes)])
    return cfg, plan


def _window(cfg, share, budget, **kw):
    return plan_memory(cfg, share, budget, "bf16", **kw).window


def test_the_budget_gives_weights_a_window_and_the_rest_to_kv_blocks(tmp_path):
    cfg, plan = _cfg_70b(tmp_path, 8)
    worker = plan.share_of(1)
    layer = worker.layer_params(cfg) * 2  # bf16 slice of one layer
    assert _window(cfg, worker, 2**50) is None  # everything fits: resident
    est = estimate(cfg, worker, "bf16")
    assert _window(cfg, worker, est.total(None) - 1) == cfg.num_layers - 1
    assert _window(cfg, worker, est.fixed + 5 * layer) == 5
    smallest = est.total(2)
    assert _window(cfg, worker, smallest) == 2
    with pytest.raises(PlanError) as e:
        _window(cfg, worker, smallest - 1)
    msg = str(e.value)
    assert f"{-(-smallest // 2**20)} MiB" in msg and "\n" not in msg and "node n1" in msg
    # The master also holds embedding + lm_head (untied: 2 x 32000 x 8192 x 2 bytes), counted.
    master = estimate(cfg, plan.share_of(0), "bf16", is_master=True)
    assert master.head >= 2 * 32000 * 8192 * 2
    with pytest.raises(PlanError, match="the master"):
        _window(cfg, plan.share_of(0), smallest, is_master=True)
    # The KV cache is counted: reserving a longer context needs a bigger budget for the same window.
    assert estimate(cfg, worker, "bf16", min_kv_tokens=32768).total(2) > smallest
    # What the window leaves becomes KV blocks, and the whole split stays within the budget.
    budget = est.total(None) + 1000 * est.block_bytes * 2
    mem = plan_memory(cfg, worker, budget, "bf16")
    assert mem.window is None and mem.kv_blocks >= est.min_blocks + 1000
    assert est.total(None, mem.kv_blocks) <= budget < est.total(None, mem.kv_blocks + 1)
    # --kv-blocks first: the window is fitted around them (here: streaming instead of resident)
    big = plan_memory(cfg, worker, budget, "bf16", kv_blocks=mem.kv_blocks + 200 * cfg.num_layers)
    assert big.kv_blocks == mem.kv_blocks + 200 * cfg.num_layers and big.window is not None
    # Without a budget (memory free at start) the pool is capped; a node without KV heads holds none.
    free = plan_memory(cfg, worker, 2**50, "bf16", budgeted=False)
    assert free.kv_blocks * BLOCK_TOKENS == UNBUDGETED_KV_TOKENS
