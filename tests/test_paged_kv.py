"""The paged KV cache and its prefix cache, through the real engine (and the HTTP API with the
official openai client): the same greedy text with the prefix cache on or off, cached tokens
reported as OpenAI does, a prompt the cache can never hold refused with a 400, and a crowd of
long requests under a small cache all served (queued, preempted and recomputed) with the text
each one gets alone."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from tests.api_helpers import serve
from tpi_node.commands.compose import build_local_engine
from tpi_node.engine.blocks import BlockPool
from tpi_node.engine.limits import BLOCK_TOKENS
from tpi_node.model.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SYSTEM = (
    "You are a careful assistant. Answer in one short sentence. The user asks about geography, "
    "history and science; be precise, never invent facts, and say when you do not know. "
)


def _run(engine, ids, params=GREEDY):
    events = list(engine.generate_sync(ids, params))
    return [e.token_id for e in events], events[0].cached_tokens


@pytest.fixture(scope="module")
def engines(smollm2_dir):
    on = build_local_engine(smollm2_dir, progress=False)
    off = build_local_engine(smollm2_dir, progress=False, prefix_cache=False)
    yield on, off
    on.shutdown()
    off.shutdown()


def test_prefix_cache_on_gives_the_text_of_cache_off_and_reuses_whole_blocks(engines):
    on, off = engines
    tok = on.tokenizer
    first = tok.encode(SYSTEM + "What is the capital of France?")
    other = tok.encode(SYSTEM + "Who wrote Hamlet?")  # another request sharing the system prompt
    shared = next(i for i, (a, b) in enumerate(zip(first, other)) if a != b)
    assert shared > 2 * BLOCK_TOKENS
    diverge = first[:shared] + tok.encode(" Name the largest ocean.", add_special_tokens=False)

    want = {name: _run(off, ids)[0] for name, ids in (("first", first), ("other", other), ("diverge", diverge))}
    got, hit = _run(on, first)
    assert got == want["first"] and hit == 0  # nothing cached yet
    got, hit = _run(on, other)
    assert got == want["other"]
    assert hit == shared // BLOCK_TOKENS * BLOCK_TOKENS  # every whole block of the shared prefix
    got, hit = _run(on, diverge)  # the same prefix, then other tokens inside a block
    assert got == want["diverge"] and hit == shared // BLOCK_TOKENS * BLOCK_TOKENS
    got, hit = _run(on, first)  # the whole prompt again: all but the block holding its last token
    assert got == want["first"] and hit == (len(first) - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert _run(off, first)[1] == 0
    stats = on.stats()["kv"]
    assert stats["used"] == 0 and stats["cached"] > 0 and 0 < stats["prefix_hit_rate"] < 1


def test_the_api_reports_cached_tokens_and_a_prompt_the_cache_cannot_hold_gets_400(smollm2_dir):
    engine = build_local_engine(smollm2_dir, progress=False, kv_blocks=64)  # 1024 tokens of KV, all told
    try:
        assert engine.max_context == 64 * BLOCK_TOKENS
        with serve(engine) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            messages = [{"role": "system", "content": SYSTEM * 3}, {"role": "user", "content": "Hello!"}]
            a = client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=4, temperature=0)
            b = client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=4, temperature=0)
            assert a.usage.prompt_tokens_details.cached_tokens == 0
            assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 2 * BLOCK_TOKENS
            assert b.choices[0].message.content == a.choices[0].message.content
            for seen in (False, True):  # the same raw prompt twice: the second finds it cached
                stream = client.completions.create(
                    model=engine.model_name,
                    prompt=SYSTEM * 3,
                    max_tokens=3,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                last = list(stream)[-1]
                assert (last.usage.prompt_tokens_details.cached_tokens > 0) == seen
            with pytest.raises(openai.BadRequestError) as e:  # more than the whole cache
                client.completions.create(model=engine.model_name, prompt=[5] * 1100, max_tokens=4)
            assert e.value.status_code == 400 and "1024" in str(e.value)
            assert client.models.list().data[0].max_model_len == 1024
            metrics = __import__("httpx").get(f"{url}/metrics").text
            assert 'tpi_kv_blocks{state="cached"}' in metrics and "tpi_prefix_cache_hit_rate" in metrics
    finally:
        engine.shutdown()


def test_24_concurrent_long_requests_under_a_small_cache_all_get_their_text_alone(smollm2_dir):
    """95-token prompts (6 blocks, the last one full once decoding starts) and 24 new tokens: 20
    blocks admit 3 sequences at a time, and their first generated blocks preempt the newest."""
    alone = build_local_engine(smollm2_dir, progress=False, prefix_cache=False)
    small = build_local_engine(smollm2_dir, progress=False, kv_blocks=20)
    try:
        tok = alone.tokenizer
        base = tok.encode(SYSTEM * 2)
        prompts = [(tok.encode(f"Question {i}: ") + base)[:95] for i in range(24)]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        want = [_run(alone, p, params)[0] for p in prompts]
        with serve(small) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)

            def one(p):
                r = client.completions.create(
                    model=small.model_name, prompt=p, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
                )
                return tok.encode(r.choices[0].text, add_special_tokens=False), r.choices[0].finish_reason

            with cf.ThreadPoolExecutor(24) as pool:
                got = list(pool.map(one, prompts))
        texts_alone = [tok.decode(w) for w in want]
        assert [tok.decode(g) for g, _ in got] == texts_alone
        assert all(reason == "length" for _, reason in got)
        s = small.stats()
        assert s["kv"]["preemptions"] > 0 and s["failed"] == 0 and s["kv"]["used"] == 0
    finally:
        alone.shutdown()
        small.shutdown()


def test_block_pool_evicts_least_recently_used_and_never_hands_out_a_block_twice():
    pool = BlockPool(8)
    a = list(range(40))  # 2 full blocks + 8 tokens
    assert pool.admit(1, a, need=40) == 0 and pool.table(1) == (0, 1, 2)
    pool.computed(1, a, 40)  # blocks 0 and 1 are full: keyed
    pool.release(1)
    assert list(pool.cached) == [1, 0] and pool.available() == 8  # the tail is the first to go
    b = list(range(100, 212))  # 7 blocks: the 6 free ones and the least recently used cached one
    assert pool.admit(2, b, need=112) == 0
    assert len(set(pool.table(2))) == 7 and 1 in pool.table(2) and pool.stats.evictions == 1
    assert pool.admit(3, a, need=40) is None  # no room now: nothing changes
    assert list(pool.cached) == [0] and 3 not in pool.tables
    pool.release(2)
    assert pool.admit(3, a, need=40) == BLOCK_TOKENS  # its head block survived the eviction
    assert pool.table(3)[0] == 0 and len(set(pool.table(3))) == 3
    assert pool.admit(4, b, need=112) is None
    assert sum(pool.refs) == 3 and pool.used() == 3
