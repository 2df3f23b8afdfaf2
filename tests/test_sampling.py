"""Sampler: penalties formula, top-k/top-p masks against brute force, greedy, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tpi_node.model.sampling import NUCLEUS_GUESS, Sampler, apply_penalties, apply_top_k, apply_top_p
from tpi_node.model.sampling_params import SamplingParams


def _logits(vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _kept(masked: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(masked)).flatten().tolist())


def _nucleus_reference(logits: torch.Tensor, top_p: float) -> set[int]:
    # Brute force in float64: best tokens one by one until their mass reaches top_p.
    probs = torch.softmax(logits.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


def test_top_k_keeps_exactly_the_k_largest():
    logits = _logits(1000, 1)
    for k in (1, 5, 50, 999):
        expected = set(sorted(range(1000), key=lambda i: -float(logits[i]))[:k])
        masked = apply_top_k(logits, k)
        assert _kept(masked) == expected
        assert torch.equal(masked[list(expected)], logits[list(expected)])
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_small_example():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    logits = probs.log()
    assert _kept(apply_top_p(logits, 0.5)) == {1}
    assert _kept(apply_top_p(logits, 0.69)) == {1, 3}
    assert _kept(apply_top_p(logits, 0.71)) == {1, 3, 4}
    assert _kept(apply_top_p(logits, 1.0)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: nucleus in the top 1024; flat: not
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_top_p_matches_brute_force(scale, top_p):
    logits = _logits(20000, 7, scale)
    kept = _kept(apply_top_p(logits, top_p))
    assert kept == _nucleus_reference(logits, top_p)
    if scale == 0.5:
        assert len(kept) > NUCLEUS_GUESS  # the full-sort path was taken


def test_penalties_formula():
    logits = torch.tensor([1.0, -2.0, 3.0, -0.5, 2.0, 0.0])
    prompt, generated = [1, 4], [2, 3, 3, 2, 2]
    rep, pres, freq = 1.5, 0.4, 0.25
    out = apply_penalties(logits, prompt, generated, rep, pres, freq)
    expected = logits.tolist()
    for i in set(prompt + generated):
        expected[i] = expected[i] / rep if expected[i] > 0 else expected[i] * rep
    for i in set(generated):
        expected[i] -= freq * generated.count(i) + pres
    assert out.tolist() == pytest.approx(expected)
    assert torch.equal(apply_penalties(logits, prompt, generated), logits)  # all off


def test_greedy_is_argmax_of_penalized_logits_and_state_is_incremental():
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.3)
    prompt = [3, 4, 5]
    sampler = Sampler(params, prompt)
    generated: list[int] = []
    for step in range(30):
        logits = _logits(64, 100 + step)
        expected = int(torch.argmax(apply_penalties(logits, prompt, generated, 1.3, 0.2, 0.3)))
        result = sampler(logits, generated)
        assert result.token_id == expected
        generated.append(result.token_id)


def test_greedy_variants_pick_argmax():
    logits = _logits(5000, 3)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)):
        assert Sampler(params, [])(logits, []).token_id == int(torch.argmax(logits))


def _run(params: SamplingParams, steps: int = 40) -> list[int]:
    sampler, out = Sampler(params, [1, 2]), []
    for step in range(steps):
        out.append(sampler(_logits(4096, step, 1.0), out).token_id)
    return out


@pytest.mark.parametrize("extra", [{}, {"top_p": 0.8}, {"top_k": 40}, {"top_k": 40, "top_p": 0.5}])
def test_same_seed_same_tokens_different_seed_differs(extra):
    a = _run(SamplingParams(temperature=0.9, seed=11, **extra))
    assert a == _run(SamplingParams(temperature=0.9, seed=11, **extra))
    assert a != _run(SamplingParams(temperature=0.9, seed=12, **extra))


def test_no_seed_is_random():
    assert _run(SamplingParams(temperature=1.0)) != _run(SamplingParams(temperature=1.0))


def test_draws_follow_the_distribution_and_respect_masks():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature = 0.7
    n = 20000  # a draw is a function of (seed, token index): token i of one long sequence
    sampler, draws = Sampler(SamplingParams(temperature=temperature, seed=0), []), []
    for _ in range(n):
        draws.append(sampler(logits, draws).token_id)
    counts = torch.bincount(torch.tensor(draws), minlength=6).double() / n
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    assert torch.allclose(counts, expected, atol=0.015)

    # top-k 3, then top-p 0.8 of those three renormalized (0.63, 0.23, 0.14): the best two.
    params = [SamplingParams(temperature=1.0, top_k=3, top_p=0.8, seed=i) for i in range(2000)]
    seen = {Sampler(p, [])(logits, []).token_id for p in params}
    assert seen == {0, 1}
    big = _logits(50000, 5, 4.0)
    nucleus = _nucleus_reference(big, 0.6)
    drawn = {Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=i), [])(big, []).token_id for i in range(500)}
    assert drawn <= nucleus and len(drawn) > 1


def test_logprobs_are_of_the_raw_distribution():
    logits = _logits(300, 9)
    params = SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.2, seed=1, logprobs=4)
    result = Sampler(params, [0, 1])(logits, [2])
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprob == pytest.approx(float(raw[result.token_id]))
    best = torch.topk(raw, 4)
    assert [t for t, _ in result.top_logprobs] == best.indices.tolist()
    assert [lp for _, lp in result.top_logprobs] == pytest.approx(best.values.tolist())
    assert Sampler(SamplingParams(logprobs=None), [])(logits, []).top_logprobs is None
    assert math.isfinite(result.logprob)
