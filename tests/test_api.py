"""The OpenAI-compatible API end to end: a real uvicorn server over the real engine, driven with
the official `openai` package (sync, async, streaming). Expected values come from the engine
itself (SamplingParams straight into Engine.generate_sync), never from constants."""

from __future__ import annotations

import asyncio
import json

try:  # openai >= 3 ships on httpx2; older clients on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx
import openai
import pytest

from tests.api_helpers import chat_prompt_ids, engine_run, local_engine, serve, tiny_model

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = local_engine(tiny_model(tmp_path_factory))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serve(engine, cluster_info=lambda: {"nodes": [{"id": "local", "rank": 0}]}) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [engine.model_name]
    assert client.models.retrieve(engine.model_name).id == engine.model_name


def test_chat_greedy_text_and_usage_equal_the_engine(client, engine):
    ids = chat_prompt_ids(engine, MSGS)
    text, toks, finish = engine_run(engine, ids, max_tokens=24, temperature=0.0)
    r = client.chat.completions.create(model=engine.model_name, messages=MSGS, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(toks))
    assert r.usage.total_tokens == len(ids) + len(toks)


def test_chat_text_parts_and_max_completion_tokens(client, engine):
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MSGS]
    a = client.chat.completions.create(model=engine.model_name, messages=MSGS, max_tokens=9, temperature=0)
    b = client.chat.completions.create(model=engine.model_name, messages=parts, max_completion_tokens=9, temperature=0)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage == a.usage


def test_completion_greedy_equals_the_engine_and_max_tokens_gives_length(client, engine):
    prompt = "The quick brown fox"
    ids = engine.tokenizer.encode(prompt)
    text, toks, _ = engine_run(engine, ids, max_tokens=17, temperature=0.0, ignore_eos=True)
    r = client.completions.create(
        model=engine.model_name, prompt=prompt, max_tokens=17, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 17 == len(toks)
    assert r.usage.prompt_tokens == len(ids)


def test_completion_token_id_prompts_and_echo(client, engine):
    ids = engine.tokenizer.encode("abc def")
    text, _, _ = engine_run(engine, ids, max_tokens=6, temperature=0.0)
    r = client.completions.create(
        model=engine.model_name, prompt=[ids, ids[:3]], max_tokens=6, temperature=0, echo=True
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == engine.tokenizer.decode(ids) + text
    assert r.usage.prompt_tokens == len(ids) + 3


def test_stop_string_ends_the_text_before_it(client, engine):
    prompt = "Once upon a time"
    ids = engine.tokenizer.encode(prompt)
    full, _, _ = engine_run(engine, ids, max_tokens=40, temperature=0.0, ignore_eos=True)
    assert len(full) >= 2, f"the tiny model's greedy text is too short to test stop: {full!r}"
    stop = full[len(full) // 2]
    expected = full[: full.index(stop)]
    r = client.completions.create(
        model=engine.model_name,
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        stop=[stop, "never-appears"],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40


def test_seeded_sampling_repeats_and_n_uses_consecutive_seeds(client, engine):
    kw = dict(model=engine.model_name, messages=MSGS, max_tokens=16, temperature=1.0, logprobs=True)

    def tokens(choice):
        return [t.token for t in choice.logprobs.content]

    def lps(choice):  # a batch of two sequences may differ in the last float bits
        return pytest.approx([t.logprob for t in choice.logprobs.content], abs=1e-4)

    a = client.chat.completions.create(seed=1234, **kw)
    b = client.chat.completions.create(seed=1234, **kw)
    c = client.chat.completions.create(seed=1235, **kw)
    assert tokens(a.choices[0]) == tokens(b.choices[0])
    assert [t.logprob for t in b.choices[0].logprobs.content] == lps(a.choices[0])
    assert tokens(a.choices[0]) != tokens(c.choices[0])
    two = client.chat.completions.create(seed=1234, n=2, **kw)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert tokens(two.choices[0]) == tokens(a.choices[0])
    assert tokens(two.choices[1]) == tokens(c.choices[0])
    assert [t.logprob for t in two.choices[1].logprobs.content] == lps(c.choices[0])
    assert a.choices[0].message.content == b.choices[0].message.content
    assert two.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in two.choices)
    assert two.usage.prompt_tokens == a.usage.prompt_tokens


def test_chat_logprobs_shape_and_greedy_consistency(client, engine):
    r = client.chat.completions.create(
        model=engine.model_name, messages=MSGS, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob <= 0.0
        # greedy: the chosen token is the most likely one
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content).replace("\ufffd", "") == r.choices[
        0
    ].message.content.replace("\ufffd", "")


def test_completion_logprobs_shape(client, engine):
    r = client.completions.create(model=engine.model_name, prompt="hello", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(d) <= 2 and max(d.values()) <= 0.0 for d in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def _sse_events(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]


def test_chat_stream_chunks_follow_openai(url, client, engine):
    ref = client.chat.completions.create(model=engine.model_name, messages=MSGS, max_tokens=12, temperature=0)
    body = dict(
        model=engine.model_name,
        messages=MSGS,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    data = _sse_events(url + "/v1/chat/completions", body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == ref.choices[0].finish_reason
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == ref.usage.model_dump(exclude_none=True)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ref.choices[0].message.content


def test_openai_stream_and_completion_stream(client, engine):
    ref = client.completions.create(model=engine.model_name, prompt="stream me", max_tokens=10, temperature=0, n=2)
    stream = client.completions.create(
        model=engine.model_name,
        prompt="stream me",
        max_tokens=10,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
        usage = chunk.usage or usage
    assert texts == {c.index: c.text for c in ref.choices}
    assert finishes == {c.index: c.finish_reason for c in ref.choices}
    assert usage.completion_tokens == ref.usage.completion_tokens


def test_async_concurrent_requests_equal_alone(url, client, engine):
    prompts = ["one", "two two", "three three three", "four"]
    alone = [
        client.completions.create(model=engine.model_name, prompt=p, max_tokens=10, temperature=0).choices[0].text
        for p in prompts
    ]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        rs = await asyncio.gather(
            *(
                aclient.completions.create(model=engine.model_name, prompt=p, max_tokens=10, temperature=0)
                for p in prompts
            )
        )
        return [r.choices[0].text for r in rs]

    assert asyncio.run(main()) == alone


def test_unknown_fields_are_ignored_and_logged(url, engine, caplog):
    caplog.set_level("INFO", logger="tpi_node.server")
    r = httpx.post(
        url + "/v1/chat/completions",
        timeout=30,
        json={
            "model": engine.model_name,
            "messages": MSGS,
            "max_tokens": 2,
            "temperature": 0,
            "tools": [],  # a served field: not reported
            "verbosity": "low",
            "some_future_field": {"x": 1},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2
    logged = [rec.getMessage() for rec in caplog.records if "some_future_field" in rec.getMessage()]
    assert logged and "verbosity" in logged[0] and "tools" not in logged[0]


def test_health_and_metrics(url, client, engine):
    h = httpx.get(url + "/health")
    assert h.status_code == 200
    assert h.json()["status"] == "ok" and h.json()["nodes"] == [{"id": "local", "rank": 0}]
    client.completions.create(model=engine.model_name, prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(url + "/metrics").text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")
    }
    assert samples['tpi_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples["tpi_generation_tokens_total"] >= 3
    assert samples["tpi_time_to_first_token_seconds_count"] >= 1
    assert samples["tpi_time_per_output_token_seconds_count"] >= 1
    assert samples['tpi_node_compute_seconds_total{node="local"}'] > 0
    assert 'tpi_node_communication_seconds_total{node="local"}' in samples
    assert 'tpi_node_stall_seconds_total{node="local"}' in samples
    assert samples["tpi_running_sequences"] == 0 and samples["tpi_queue_depth"] == 0


def test_chat_stream_with_n_and_logprobs(client, engine):
    ref = client.chat.completions.create(
        model=engine.model_name, messages=MSGS, max_tokens=7, temperature=0, n=2, logprobs=True, top_logprobs=1
    )
    stream = client.chat.completions.create(
        model=engine.model_name,
        messages=MSGS,
        max_tokens=7,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=1,
        stream=True,
    )
    roles, texts, tokens, finishes = {}, {0: "", 1: ""}, {0: [], 1: []}, {}
    for chunk in stream:
        for ch in chunk.choices:
            roles.setdefault(ch.index, ch.delta.role)
            texts[ch.index] += ch.delta.content or ""
            if ch.logprobs is not None:
                tokens[ch.index] += [t.token for t in ch.logprobs.content]
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    for c in ref.choices:
        assert texts[c.index] == c.message.content
        assert tokens[c.index] == [t.token for t in c.logprobs.content]
        assert finishes[c.index] == c.finish_reason
