"""/v1/embeddings and prompt logprobs (/v1/completions with echo + logprobs) through the real
engine and a real HTTP server, with the official openai client: embeddings equal transformers'
pooled hidden states, are the same alone or in a batch, as text or token ids, as floats or base64;
prompt logprobs equal transformers' log-softmax (fp32), across prefill chunks and preemptions,
also with max_tokens 0 and streamed; lm-eval's `local-completions` model scores a small
multiple-choice task (tests/data/tiny_mc.*) as lm-eval's `hf` model does on the same weights."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import struct
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.api_helpers import engine_idle, serve, wait_until
from tpi_node.commands.compose import build_local_engine
from tpi_node.engine.limits import EngineLimits
from tpi_node.model.sampling_params import SamplingParams

DATA = Path(__file__).parent / "data"
TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, Berlin is the "
    "capital of Germany, and the longest river in Africa is the Nile, which flows north into the"
)
OTHERS = ["Hello there!", "Embeddings pool the hidden states of every position of the input text."]


@pytest.fixture(scope="module")
def hf(smollm2_hf):
    return smollm2_hf


@pytest.fixture(scope="module")
def served(smollm2_dir):
    engine = build_local_engine(smollm2_dir, progress=False)
    try:
        with serve(engine) as url:
            yield engine, url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    finally:
        engine.shutdown()


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[L, V] log-softmax of transformers' fp32 logits: row i is the distribution of token i+1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def _hf_embedding(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        h = hf.model(torch.tensor([ids])).last_hidden_state[0].double()  # [L, H], after the final norm
    mean = h.mean(0)
    return mean / mean.norm()


# ---- /v1/embeddings --------------------------------------------------------------------------


def test_embeddings_are_unit_mean_pooled_hidden_states_the_same_alone_or_batched(served, hf):
    engine, url, client = served
    tok, size = engine.tokenizer, engine.cfg.hidden_size
    assert size == 576
    alone = client.embeddings.create(model=engine.model_name, input=TEXT, encoding_format="float")
    assert alone.object == "list" and alone.model == engine.model_name
    vec = torch.tensor(alone.data[0].embedding, dtype=torch.float64)
    assert vec.shape == (size,) and abs(vec.norm().item() - 1.0) < 1e-5
    ids = tok.encode(TEXT)
    assert alone.usage.prompt_tokens == alone.usage.total_tokens == len(ids)
    assert torch.allclose(vec, _hf_embedding(hf, ids), atol=1e-4)  # mean of the final-normed states

    batch = client.embeddings.create(
        model=engine.model_name, input=[OTHERS[0], TEXT, OTHERS[1]], encoding_format="float"
    )
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.usage.prompt_tokens == sum(len(tok.encode(t)) for t in [OTHERS[0], TEXT, OTHERS[1]])
    assert torch.allclose(torch.tensor(batch.data[1].embedding, dtype=torch.float64), vec, atol=1e-5, rtol=0)
    for d, text in zip(batch.data, [OTHERS[0], TEXT, OTHERS[1]]):
        assert torch.allclose(
            torch.tensor(d.embedding, dtype=torch.float64), _hf_embedding(hf, tok.encode(text)), atol=1e-4
        )
    assert not torch.allclose(torch.tensor(batch.data[0].embedding), torch.tensor(batch.data[2].embedding), atol=1e-2)

    # token ids (one list, or a list of lists) embed as the text they spell
    by_ids = client.embeddings.create(model=engine.model_name, input=ids, encoding_format="float")
    assert by_ids.data[0].embedding == alone.data[0].embedding
    by_lists = client.embeddings.create(
        model=engine.model_name, input=[tok.encode(OTHERS[0]), ids], encoding_format="float"
    )
    assert torch.allclose(torch.tensor(by_lists.data[1].embedding, dtype=torch.float64), vec, atol=1e-5, rtol=0)

    # base64: little-endian float32 bytes, exactly the floats; the client's default asks for it
    raw = client.embeddings.create(model=engine.model_name, input=TEXT, encoding_format="base64")
    b64 = raw.data[0].embedding
    assert isinstance(b64, str)
    assert list(struct.unpack(f"<{size}f", base64.b64decode(b64))) == alone.data[0].embedding
    assert (
        list(client.embeddings.create(model=engine.model_name, input=TEXT).data[0].embedding) == alone.data[0].embedding
    )
    same = client.embeddings.create(model=engine.model_name, input=TEXT, dimensions=size, encoding_format="float")
    assert same.data[0].embedding == alone.data[0].embedding


def test_embeddings_take_nothing_from_the_prefix_cache_and_free_their_blocks(served):
    engine, _, client = served
    long_text = TEXT * 3  # several whole KV blocks
    wait_until(lambda: engine_idle(engine), what="an idle engine")
    cached_before = engine.stats()["cached_prompt_tokens"]
    client.completions.create(model=engine.model_name, prompt=long_text, max_tokens=1)  # fills the cache
    hits = engine.stats()["cached_prompt_tokens"] - cached_before
    a = client.embeddings.create(model=engine.model_name, input=long_text, encoding_format="float")
    b = client.embeddings.create(model=engine.model_name, input=[long_text, long_text], encoding_format="float")
    assert engine.stats()["cached_prompt_tokens"] - cached_before == hits  # every row computed again
    # equal up to the last bits: whether b's two inputs share a step changes the matmuls' shapes
    assert a.data[0].embedding == pytest.approx(b.data[0].embedding, abs=1e-5)
    assert b.data[1].embedding == pytest.approx(b.data[0].embedding, abs=1e-5)
    wait_until(lambda: engine_idle(engine), what="every embedding's blocks back in the pool")


def test_embeddings_errors_are_openai_shaped_4xx(served):
    engine, url, client = served
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
    for bad in (
        dict(input="hi", dimensions=64),
        dict(input=""),
        dict(input=[]),
        dict(input=[[]]),
        dict(input=[10**9]),
        dict(input="hi", encoding_format="int8"),
        dict(input="word " * (engine.max_context + 5)),
    ):
        r = httpx.post(f"{url}/v1/embeddings", json={"model": engine.model_name, **bad}, timeout=60)
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    wait_until(lambda: engine_idle(engine), what="an idle engine")


# ---- prompt logprobs -------------------------------------------------------------------------


def _check_prompt_part(lp, ids: list[int], ref: torch.Tensor, k: int) -> None:
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first
    got = torch.tensor(lp.token_logprobs[1 : len(ids)], dtype=torch.float64)
    want = torch.tensor([ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)], dtype=torch.float64)
    assert (got - want).abs().max().item() < 1e-4
    for i in range(1, len(ids)):
        tops = lp.top_logprobs[i]
        assert len(tops) == k
        assert abs(max(tops.values()) - ref[i - 1].max().item()) < 1e-4


def test_echo_logprobs_equal_transformers_log_softmax(served, hf):
    engine, _, client = served
    tok = engine.tokenizer
    ids = tok.encode(TEXT)
    assert 35 <= len(ids) <= 45
    ref = _hf_logprobs(hf, ids)
    # the prompt's blocks are in the prefix cache now; prompt logprobs must compute every row anyway
    client.completions.create(model=engine.model_name, prompt=TEXT, max_tokens=1)
    r = client.completions.create(
        model=engine.model_name, prompt=TEXT, echo=True, logprobs=2, max_tokens=3, temperature=0
    )
    c = r.choices[0]
    echo = tok.decode(ids)
    assert c.text.startswith(echo) and len(c.logprobs.tokens) == len(ids) + 3
    assert c.logprobs.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
    _check_prompt_part(c.logprobs, ids, ref, k=2)
    # the generated tokens follow: greedy, so the first is the argmax after the prompt
    assert abs(c.logprobs.token_logprobs[len(ids)] - ref[-1].max().item()) < 1e-4
    offsets = c.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[len(ids)] == len(echo)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3

    # max_tokens 0: the prompt alone, nothing generated nor counted
    z = client.completions.create(model=engine.model_name, prompt=ids, echo=True, logprobs=1, max_tokens=0)
    zc = z.choices[0]
    assert zc.text == echo and zc.finish_reason == "length"
    assert len(zc.logprobs.tokens) == len(ids) and z.usage.completion_tokens == 0
    _check_prompt_part(zc.logprobs, ids, ref, k=1)
    assert zc.logprobs.token_logprobs[1:] == c.logprobs.token_logprobs[1 : len(ids)]

    # streamed: the prompt (text and logprobs) in the first chunk, then the tokens as usual
    chunks = list(
        client.completions.create(
            model=engine.model_name, prompt=TEXT, echo=True, logprobs=2, max_tokens=3, temperature=0, stream=True
        )
    )
    first = chunks[0].choices[0]
    assert first.text == echo and first.logprobs.token_logprobs == c.logprobs.token_logprobs[: len(ids)]
    joined = [x for ch in chunks for cc in ch.choices if cc.logprobs for x in cc.logprobs.token_logprobs]
    assert joined == c.logprobs.token_logprobs
    assert "".join(cc.text for ch in chunks for cc in ch.choices) == c.text
    z_stream = list(
        client.completions.create(model=engine.model_name, prompt=ids, echo=True, logprobs=1, max_tokens=0, stream=True)
    )
    assert z_stream[0].choices[0].logprobs.token_logprobs == zc.logprobs.token_logprobs
    assert [cc.finish_reason for ch in z_stream for cc in ch.choices][-1] == "length"
    # without echo, max_tokens 0 is an empty completion
    e = client.completions.create(model=engine.model_name, prompt=TEXT, max_tokens=0, logprobs=1)
    assert e.choices[0].text == "" and e.choices[0].logprobs.tokens == [] and e.usage.completion_tokens == 0
    wait_until(lambda: engine_idle(engine), what="an idle engine")


def test_prompt_logprobs_across_prefill_chunks_and_preemptions(smollm2_dir, hf):
    """Prefill in chunks of 16 tokens and a KV cache that cannot hold every sequence at once, so
    sequences are preempted (some in the middle of their prefill) and computed again: every
    sequence's prompt logprobs are still transformers' ones, each position recorded once."""
    engine = build_local_engine(
        smollm2_dir, progress=False, kv_blocks=12, limits=EngineLimits(prefill_chunk=16, max_step_tokens=40)
    )
    try:
        tok = engine.tokenizer
        prompts = [tok.encode(f"{i} apples and {i + 1} pears. " + TEXT) for i in range(5)]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            runs = list(pool.map(lambda ids: list(engine.generate_sync(ids, params)), prompts))
        assert engine.stats()["kv"]["preemptions"] > 0
        for ids, events in zip(prompts, runs):
            assert len(events) == 24 and sum(e.prompt_logprobs is not None for e in events) == 1
            lps = events[0].prompt_logprobs
            assert len(lps) == len(ids) and lps[0] is None
            ref = _hf_logprobs(hf, ids)
            want = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
            assert max(abs(a[0] - b) for a, b in zip(lps[1:], want)) < 1e-4
            assert all(len(a[1]) == 1 and abs(a[1][0][1] - ref[i].max().item()) < 1e-4 for i, a in enumerate(lps[1:]))
        wait_until(lambda: engine_idle(engine), what="an idle engine")
    finally:
        engine.shutdown()


# ---- lm-eval ---------------------------------------------------------------------------------


def _task_dir(tmp_path: Path) -> Path:
    """tests/data/tiny_mc.yaml with its data file's absolute path (lm-eval resolves it from the cwd)."""
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((DATA / "tiny_mc.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(DATA / "tiny_mc.jsonl")
    (tmp_path / "tiny_mc.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def test_lm_eval_local_completions_scores_like_the_hf_model(served, hf, smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything is local: the model dir, the task's jsonl
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]
    from lm_eval.tasks import TaskManager

    engine, url, _ = served
    tasks = TaskManager(include_path=str(_task_dir(tmp_path)))
    common = dict(tasks=["tpi_tiny_mc"], task_manager=tasks, log_samples=True, random_seed=0)
    api = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=dict(
            base_url=f"{url}/v1/completions",
            model=engine.model_name,
            tokenizer=str(smollm2_dir),
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            batch_size=8,  # 8 prompts per request: one engine batch
            max_retries=1,
        ),
        **common,
    )
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    # lm-eval's own "hf" model around transformers' model of the same GGUF (the session's, loaded once)
    hf_tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=8, device="cpu"), **common)
    got, want = api["samples"]["tpi_tiny_mc"], ref["samples"]["tpi_tiny_mc"]
    assert len(got) == len(want) == sum(1 for line in (DATA / "tiny_mc.jsonl").open() if line.strip())
    for a, b in zip(sorted(got, key=lambda s: s["doc_id"]), sorted(want, key=lambda s: s["doc_id"])):
        assert a["doc_id"] == b["doc_id"]
        ll_a, ll_b = [r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]]
        assert len(ll_a) == 4 and max(abs(x - y) for x, y in zip(ll_a, ll_b)) < 1e-3, (a["doc"], ll_a, ll_b)
        assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]  # is_greedy
    acc = api["results"]["tpi_tiny_mc"]["acc,none"]
    assert acc == ref["results"]["tpi_tiny_mc"]["acc,none"] and acc > 0.25  # better than chance
