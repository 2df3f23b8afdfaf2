"""The lm_head split by vocabulary (--head-split on): real `tpi-node join` workers each hold their
rows (head.safetensors in their slice set) and answer every step's HeadAsk over gRPC; the
master merges. Greedy and seeded text, logprobs and prompt logprobs equal the single-node
engine's, whose whole-row head is the reference (itself checked against transformers in
test_cluster.py / test_golden.py)."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from tests.test_cluster import PROMPT, _reference, cluster, home  # noqa: F401 (home: the fixture)
from tpi_node.engine.vocab import choose_head_split
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.weights.head_rows import HEAD_FILE

REQUESTS = [
    SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=3),
    SamplingParams(max_tokens=16, temperature=0.9, seed=5, ignore_eos=True),  # Gumbel-max on every node
    SamplingParams(max_tokens=16, temperature=0.7, top_k=8, top_p=0.9, seed=6, ignore_eos=True, logprobs=2),
    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.8, seed=7, ignore_eos=True),  # whole rows gathered
    SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),  # whole rows
    SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2),
]


def _run(engine) -> list:
    out = []
    for p in REQUESTS:
        events = list(engine.generate_sync(PROMPT, p))
        out.append(
            (
                [e.token_id for e in events if e.token_id is not None],
                [e.logprob for e in events if e.token_id is not None],
                [e.top_logprobs for e in events if e.token_id is not None],
                [e.prompt_logprobs for e in events if e.prompt_logprobs is not None],
            )
        )
    return out


@pytest.mark.parametrize("preset, nodes", [("tiny-llama", 1), ("tiny-llama3", 2), ("tiny-llama", 4)])
def test_split_head_gives_the_whole_heads_text(tiny_model_dir, home, preset, nodes):  # noqa: F811
    model = tiny_model_dir(preset)
    ref = _reference(model)
    try:
        want = _run(ref)
    finally:
        ref.shutdown()
    with cluster(model, nodes, home, master_speed=1.0, head_split="on") as (master, engine, _, _):
        assert engine.head.split and engine.head.nbytes() == 0  # the master holds no whole lm_head
        plan = master.membership.plan
        ranges = [s.vocab_rows(engine.cfg) for s in plan.shares]
        assert ranges[0][0] == 0 and ranges[-1][1] == engine.head.vocab_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for r in range(1, nodes):  # each worker's slice set holds exactly its rows
            files = {f.name for f in master.coordinator.deployment.manifests[r]}
            assert HEAD_FILE in files
            path = master.coordinator.deployment.shard_dir(master.coordinator.spec, r) / HEAD_FILE
            with safe_open(str(path), "pt") as f:
                assert f.get_slice("lm_head").get_shape()[0] == ranges[r][1] - ranges[r][0]
        got = _run(engine)
        stats = engine.driver.stats()["master"]
    for (wt, wl, wtop, wp), (gt, gl, gtop, gp) in zip(want, got):
        assert gt == wt
        assert gl == pytest.approx(wl, abs=1e-4)
        for a, b in zip(wtop, gtop):
            assert (a is None) == (b is None)
            if a is not None:
                assert [t for t, _ in b] == [t for t, _ in a]
                assert [v for _, v in b] == pytest.approx([v for _, v in a], abs=1e-4)
        for a, b in zip(wp, gp):  # one list per request that asked, an entry per prompt token
            assert len(a) == len(b) and (a[0] is None) == (b[0] is None)
            for ea, eb in zip(a[1:], b[1:]):
                assert eb[0] == pytest.approx(ea[0], abs=1e-4)
                assert [t for t, _ in eb[1]] == [t for t, _ in ea[1]]
    assert stats["head_s"] > 0


def test_auto_splits_a_big_head_over_the_star_only():
    assert choose_head_split("auto", 128256, 2048, 4) == (
        True,
        "lm_head: split by vocabulary over the nodes (263M parameters; --head-split auto)",
    )
    assert not choose_head_split("auto", 49152, 576, 3)[0]  # SmolLM2: one more hop costs more than it saves
    assert not choose_head_split("auto", 128256, 2048, 1)[0]
    assert choose_head_split("on", 49152, 576, 1)[0]  # workers may join later
    assert not choose_head_split("on", 128256, 2048, 4, star=False)[0]  # gloo / NVLink groups do not gather
    assert not choose_head_split("off", 128256, 2048, 4)[0]
