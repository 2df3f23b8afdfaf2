"""Partition planner invariants (property tests with hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpi_node.model.config import ModelConfig
from tpi_node.weights.plan import FFN_BLOCK, NodeCapacity, PartitionPlan, PlanError, make_plan


def cfg_of(kv: int, g: int, ffn: int, hidden: int = 256, hd: int = 32) -> ModelConfig:
    return ModelConfig.from_dict(
        dict(
            model_type="llama",
            vocab_size=100,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=4,
            num_attention_heads=kv * g,
            num_key_value_heads=kv,
            head_dim=hd,
        )
    )


caps_st = st.lists(st.tuples(st.integers(1, 16), st.one_of(st.none(), st.floats(0.1, 10))), min_size=1, max_size=9)


@settings(max_examples=150, deadline=None)
@given(kv=st.integers(1, 8), g=st.integers(1, 4), ffn=st.integers(64, 4096), caps=caps_st)
def test_every_head_and_column_exactly_once(kv, g, ffn, caps):
    cfg = cfg_of(kv, g, ffn)
    nodes = [NodeCapacity(f"n{i}", 0, cores=c, speed=s) for i, (c, s) in enumerate(caps)]
    plan = make_plan(cfg, nodes)
    heads = [h for s in plan.shares for h in range(s.kv_start, s.kv_end)]
    cols = [c for s in plan.shares for c in range(s.ffn_start, s.ffn_end)]
    assert sorted(heads) == list(range(kv)) and len(heads) == kv
    assert sorted(cols) == list(range(ffn)) and len(cols) == ffn
    assert [s.rank for s in plan.shares] == list(range(len(nodes)))
    # deterministic, and the digest names the plan
    again = make_plan(cfg, nodes)
    assert again == plan and again.digest == plan.digest
    assert PartitionPlan.from_json(plan.to_json()) == plan


@settings(max_examples=100, deadline=None)
@given(kv=st.integers(2, 8), cores=st.lists(st.integers(1, 16), min_size=2, max_size=6))
def test_shares_follow_capacity(kv, cores):
    cfg = cfg_of(kv, 2, 64 * FFN_BLOCK)
    plan = make_plan(cfg, [NodeCapacity(f"n{i}", 0, cores=c) for i, c in enumerate(cores)])
    work = [s.layer_params(cfg) for s in plan.shares]
    total, wsum = sum(work), sum(cores)
    # each node's share of the layer is within one unit (a KV group or FFN block) of its target
    unit = max(cfg.head_dim * cfg.hidden_size * (2 * cfg.q_per_kv + 2), 3 * cfg.hidden_size * FFN_BLOCK)
    for w, c in zip(work, cores):
        assert abs(w - total * c / wsum) <= 1.5 * unit + 1e-6 * total
    # a strictly faster node never gets less work than a slower one (up to one unit)
    for w1, c1 in zip(work, cores):
        for w2, c2 in zip(work, cores):
            if c1 > c2:
                assert w1 >= w2 - unit


def test_uneven_cases_from_the_issue():
    # 3 KV heads over 2 equal nodes
    p = make_plan(cfg_of(3, 3, 1536), [NodeCapacity("a", 0, 2), NodeCapacity("b", 0, 2)])
    assert [s.n_kv for s in p.shares] == [2, 1]
    assert p.shares[1].n_ffn > p.shares[0].n_ffn  # fewer heads -> more FFN columns
    # 5 nodes for 4 KV heads: one node is FFN-only
    p = make_plan(cfg_of(4, 2, 2048), [NodeCapacity(f"n{i}", 0, 1) for i in range(5)])
    assert sorted(s.n_kv for s in p.shares) == [0, 1, 1, 1, 1]
    assert all(s.n_ffn > 0 for s in p.shares)


def test_refuses_when_nodes_cannot_hold_the_model():
    cfg = cfg_of(4, 2, 2048)
    with pytest.raises(PlanError, match="needs at least"):
        make_plan(cfg, [NodeCapacity("small", 1024, 1)])
    with pytest.raises(PlanError, match="duplicate node ids"):
        make_plan(cfg, [NodeCapacity("x", 0, 1), NodeCapacity("x", 0, 1)])
