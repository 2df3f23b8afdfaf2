"""Speculative decoding by prompt lookup (engine/speculative.py) on the default model: the text is
that of plain decoding - greedy and seeded sampling, at 1 and 3 nodes, with repetition in the
prompt or not, several sequences at once, a stop string or max_tokens landing inside an accepted
draft - while repetitive answers take fewer steps; and no draft leaves KV blocks behind."""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from tests.test_cluster import cluster, home  # noqa: F401  (home: a fixture)
from tpi_node.commands.compose import build_local_engine
from tpi_node.engine.blocks import BlockPool
from tpi_node.engine.limits import BLOCK_TOKENS
from tpi_node.engine.speculative import K_MAX, PromptLookup
from tpi_node.model.sampling_params import SamplingParams

CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b
'''
GREEDY = SamplingParams(max_tokens=48, temperature=0.0)


@pytest.fixture(scope="module")
def engines(smollm2_dir):
    on = build_local_engine(smollm2_dir, progress=False, speculative="lookup")
    off = build_local_engine(smollm2_dir, progress=False, speculative="off")
    yield on, off
    on.shutdown()
    off.shutdown()


def _prompts(tok) -> dict[str, list[int]]:
    chat = [
        ("repeat", "Repeat this code exactly, with a comment on every line:\n\n" + CODE),
        ("free", "Tell me about the moon in three sentences."),
    ]
    return {k: tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), False) for k, c in chat}


def _ids(engine, ids, params) -> list[int]:
    return [e.token_id for e in engine.generate_sync(ids, params)]


def test_greedy_and_seeded_text_is_that_of_plain_decoding_and_repetition_takes_fewer_steps(engines):
    on, off = engines
    for name, ids in _prompts(on.tokenizer).items():
        steps0 = on.stats()["steps"]
        want = _ids(off, ids, GREEDY)
        assert _ids(on, ids, GREEDY) == want, name
        if name == "repeat":  # the answer copies the prompt: several tokens per step
            assert on.stats()["steps"] - steps0 < 0.8 * len(want)
        for seed in range(6):  # the same draws in the same order: the same sampled text
            p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=seed)
            assert _ids(on, ids, p) == _ids(off, ids, p), (name, seed)
    spec = on.stats()["speculative"]
    assert spec["accepted"] > 0 and spec["proposed"] >= spec["accepted"]
    assert on.stats()["kv"]["used"] == 0 and off.stats()["speculative"]["proposed"] == 0


def test_stop_strings_and_max_tokens_inside_an_accepted_draft(engines):
    on, off = engines
    ids = _prompts(on.tokenizer)["repeat"]
    full = off.tokenizer.decode(_ids(off, ids, GREEDY))
    assert "Fibonacci number" in full
    for params in (
        SamplingParams(max_tokens=48, temperature=0.0, stop=("Fibonacci number",)),  # inside a copied line
        SamplingParams(max_tokens=17, temperature=0.0),  # ends inside a draft
        SamplingParams(max_tokens=30, temperature=0.0, stop=("return",), logprobs=2),
    ):
        accepted = on.stats()["speculative"]["accepted"]
        got, want = list(on.generate_sync(ids, params)), list(off.generate_sync(ids, params))
        assert [(e.token_id, e.text, e.finish_reason) for e in got] == [
            (e.token_id, e.text, e.finish_reason) for e in want
        ]
        assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-4)
        assert on.stats()["speculative"]["accepted"] > accepted  # drafts were taken on the way
    assert on.stats()["kv"]["used"] == 0


def test_several_sequences_at_once_and_a_cancelled_stream_leave_no_blocks(engines):
    on, off = engines
    prompts = list(_prompts(on.tokenizer).values())
    # greedy: a batch's numerics differ from a lone sequence's in the last bits, which sampling
    # can turn into another token (with or without speculation)
    work = [(p, SamplingParams(max_tokens=n, temperature=0.0)) for p in prompts for n in (24, 40)]
    want = [_ids(off, p, sp) for p, sp in work]
    with cf.ThreadPoolExecutor(len(work)) as pool:  # continuous batching: drafts of several at once
        got = list(pool.map(lambda w: _ids(on, *w), work))
    assert got == want
    stream = on.generate_sync(prompts[0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    for _ in range(12):
        next(stream)
    stream.close()  # the client went away mid-answer, drafts in flight
    deadline = time.monotonic() + 10  # the step thread frees it at its next round
    while on.stats()["kv"]["used"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert on.stats()["kv"]["used"] == 0 and on.stats()["running"] == 0


def test_three_nodes_give_the_single_node_text(smollm2_dir, home):  # noqa: F811
    ref = build_local_engine(smollm2_dir, progress=False, speculative="off")
    try:
        prompts = list(_prompts(ref.tokenizer).values())
        want = [_ids(ref, p, GREEDY) for p in prompts]
    finally:
        ref.shutdown()
    with cluster(smollm2_dir, 3, home, speculative="lookup") as (_, engine, _, _):
        assert [_ids(engine, p, GREEDY) for p in prompts] == want
        stats = engine.stats()
        assert stats["speculative"]["accepted"] > 0 and stats["kv"]["used"] == 0


def test_prompt_lookup_proposes_what_followed_the_latest_match_and_adapts_k():
    d = PromptLookup()
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert d.propose(tokens) == [7, 8, 1, 2]  # after the latest earlier [1, 2, 3], k = 4
    tokens += [7, 8]
    assert d.propose(tokens) == [1, 2, 3, 7]  # the index grew with the new tokens: [3, 7, 8] was seen
    fresh = PromptLookup()
    assert fresh.propose([4, 5, 6]) == []  # nothing seen before
    fresh.record(4, 4)
    assert fresh.k == 8
    fresh.record(8, 8)
    assert fresh.k == K_MAX
    fresh.record(8, 2)
    assert fresh.k == 3
    fresh.record(3, 0)
    assert fresh.k == 1


def test_trim_gives_back_the_blocks_of_rejected_drafts_only():
    pool = BlockPool(8)
    tokens = list(range(40))
    assert pool.admit(1, tokens, need=40) == 0
    assert pool.grow(1, 40 + 2 * BLOCK_TOKENS)  # room for drafts
    assert len(pool.table(1)) == 5
    pool.computed(1, tokens, 40)
    pool.trim(1, 41)  # one more token accepted: 3 blocks hold 41
    assert len(pool.table(1)) == 3 and pool.available() == 5
    pool.release(1)
    assert pool.available() == 8 and len(pool.cached) == 2  # its two full blocks stay findable


def test_drafts_are_dropped_rather_than_preempt_another_sequence():
    from tpi_node.engine.limits import EngineLimits
    from tpi_node.engine.scheduler import Scheduler
    from tpi_node.engine.sequence import Sequence

    def seq(i: int, tokens: list[int]) -> Sequence:
        params = SamplingParams(max_tokens=64, temperature=0.0)
        s = Sequence(i, str(i), list(tokens), len(tokens), params, None, None, None, None, drafter=PromptLookup())
        return s

    sch = Scheduler(EngineLimits(), num_blocks=4)
    repetitive = [5, 6, 7, 8] * 7 + [5, 6, 7]  # 31 tokens: 2 blocks, and drafts to propose
    a, b = seq(1, repetitive), seq(2, list(range(100, 131)))  # b: 31 tokens, 2 blocks
    sch.add(a)
    sch.add(b)
    work = sch.schedule()  # both prefill: all 4 blocks are taken
    sch.computed(work)
    a.tokens.append(8)  # each sampled a token; a's drafts would need a third block
    b.tokens.append(131)
    work = sch.schedule()
    assert [(s.seq_id, len(c)) for s, c in work] == [(1, 1), (2, 1)]  # a decodes its one token
    assert a.draft == [] and sch.preemptions == 0 and len(sch.running) == 2
