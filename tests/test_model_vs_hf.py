"""Our model math against Hugging Face transformers on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.hf_util import OurModel, make_hf_model


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama3"])
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param, d)
    return hf, OurModel(d)


def test_prefill_and_cached_decode_logits_match(pair):
    hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, ours.cfg.vocab_size, (37,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = ours.step(7, 0, ids)
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()

    # 16 cached decode steps, each compared with HF's full forward of the same prefix
    seq = list(ids)
    for _ in range(16):
        nxt = int(got[-1].argmax())
        seq.append(nxt)
        got = ours.step(7, len(seq) - 1, [nxt])
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, -1:]
        assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
    ours.free([7])


def test_greedy_tokens_match_hf_generate(pair):
    hf, ours = pair
    ids = list(range(3, 15))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids) :].tolist()
    assert ours.greedy(ids, len(ref)) == ref


def test_chunked_prefill_equals_unchunked(pair):
    _, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(0, ours.cfg.vocab_size, (50,)).tolist()
    whole = ours.step(1, 0, ids)
    parts = [ours.step(2, 0, ids[:17]), ours.step(2, 17, ids[17:33]), ours.step(2, 33, ids[33:])]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5, rtol=0)
    ours.free([1, 2])
