"""Next-token choice for one sequence: penalties, greedy or temperature/top-k/top-p sampling.

Order (as vLLM and HF apply it): repetition penalty over prompt + generated ids, OpenAI
presence/frequency penalties over generated ids, then argmax when greedy, else temperature,
top-k, top-p and a draw from a per-sequence torch.Generator (same seed -> same tokens).
Reported logprobs are those of the model's own distribution (log_softmax of the raw logits,
vLLM's default), not of the penalized/truncated one.

Cost per call: O(vocab) elementwise work plus at most one sort (top-p without top-k);
with top-k, top-p runs on the k sorted values torch.topk already returns.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from tpi_node.model.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None  # best first


def penalty_state(
    vocab: int, prompt_ids, generated_ids, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (seen [vocab] bool: id in prompt or output, counts [vocab] float: uses in output)."""
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    _record(seen, counts, prompt_ids, generated_ids)
    return seen, counts


def _record(seen: torch.Tensor, counts: torch.Tensor, prompt_ids, generated_ids) -> None:
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=seen.device)
    gen = torch.as_tensor(list(generated_ids), dtype=torch.long, device=seen.device)
    seen[prompt] = True
    seen[gen] = True
    counts.index_add_(0, gen, torch.ones(gen.shape, dtype=counts.dtype, device=counts.device))


def penalize(
    logits: torch.Tensor,
    seen: torch.Tensor,
    counts: torch.Tensor,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """logits [vocab] -> penalized copy (elementwise only, no sort).
    Repetition (CTRL/HF): for every seen id, l/p if l > 0 else l*p.
    OpenAI: l - frequency * count - presence * (count > 0)."""
    out = logits.clone()
    if repetition_penalty != 1.0:
        scaled = torch.where(out > 0, out / repetition_penalty, out * repetition_penalty)
        out = torch.where(seen, scaled, out)
    if presence_penalty or frequency_penalty:
        out -= frequency_penalty * counts + presence_penalty * (counts > 0).to(out.dtype)
    return out


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids,
    generated_ids,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """Penalties from scratch (the Sampler keeps the same state incrementally)."""
    seen, counts = penalty_state(logits.shape[-1], prompt_ids, generated_ids, logits.device)
    return penalize(logits, seen, counts, repetition_penalty, presence_penalty, frequency_penalty)


def _top_p_keep(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """sorted_probs [n] descending -> bool [n]: the smallest prefix whose probability mass
    reaches top_p (always at least the best token)."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = mass_before < top_p
    keep[0] = True
    return keep


NUCLEUS_GUESS = 1024  # top-p first looks at this many best tokens; sorts all only if needed


def _sorted_head(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [vocab] -> (descending probs, their ids) covering at least top_p of the mass.
    A real model's nucleus is nearly always inside the best NUCLEUS_GUESS tokens, and
    topk(1024) is ~20x cheaper than sorting 150k entries."""
    if probs.shape[-1] > NUCLEUS_GUESS:
        vals, ids = torch.topk(probs, NUCLEUS_GUESS)
        if float(vals.sum()) >= top_p:
            return vals, ids
    return torch.sort(probs, descending=True)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Copy of logits [vocab] with all but the k largest set to -inf (ties at the k-th value
    are kept). k <= 0 or k >= vocab -> unchanged."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits.clone()
    kth = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Copy of logits [vocab] keeping the nucleus: the most likely tokens whose cumulative
    probability first reaches top_p. top_p >= 1 -> unchanged."""
    if top_p >= 1.0:
        return logits.clone()
    vals, ids = _sorted_head(torch.softmax(logits, dim=-1), top_p)
    kept = ids[_top_p_keep(vals, top_p)]
    out = torch.full_like(logits, float("-inf"))
    out[kept] = logits[kept]
    return out


def _inverse_cdf(weights: torch.Tensor, gen: torch.Generator) -> int:
    """Index drawn with probability weights[i] / sum: one uniform number and a cumsum
    (torch.multinomial over 150k entries costs ~20x more on CPU)."""
    cdf = torch.cumsum(weights, dim=-1)
    u = torch.rand(1, generator=gen, device=weights.device) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u, right=True)), weights.shape[-1] - 1)
    return i if float(weights[i]) > 0 else int(torch.argmax(weights))  # rounding at the end


class Sampler:
    """One per sequence: holds its random generator and its penalty bookkeeping."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._gen: torch.Generator | None = None
        # Penalty state, built on the first call (vocab and device come with the logits) and
        # extended with each new generated id.
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._n_recorded = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen

    def __call__(self, logits: torch.Tensor, generated_ids: list[int]) -> SampleResult:
        """logits [vocab] (float32) of the next position; generated_ids so far (no prompt)."""
        p = self.params
        logits = logits.float().reshape(-1)
        logprobs = torch.log_softmax(logits, dim=-1)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            seen, counts = self._penalty_state(logits, generated_ids)
            logits = penalize(logits, seen, counts, p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            token = int(torch.argmax(logits))
        else:
            token = self._draw(logits / p.temperature)
        top = None
        if p.logprobs:
            vals, ids = torch.topk(logprobs, min(p.logprobs, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), vals.tolist()))
        return SampleResult(token, float(logprobs[token]), top)

    def _penalty_state(self, logits: torch.Tensor, generated_ids: list[int]):
        n = len(generated_ids)
        if (
            self._seen is None
            or self._seen.shape[0] != logits.shape[-1]
            or self._seen.device != logits.device
            or n < self._n_recorded
        ):
            self._seen, self._counts = penalty_state(logits.shape[-1], self.prompt_ids, generated_ids, logits.device)
        elif n > self._n_recorded:
            _record(self._seen, self._counts, (), generated_ids[self._n_recorded :])
        self._n_recorded = n
        return self._seen, self._counts

    def _draw(self, logits: torch.Tensor) -> int:
        """logits [vocab], already divided by the temperature -> a sampled token id."""
        p = self.params
        gen = self._generator(logits.device)
        if 0 < p.top_k < logits.shape[-1]:
            vals, ids = torch.topk(logits, p.top_k)  # sorted, descending
            probs = torch.softmax(vals, dim=-1)  # renormalized over the k
        elif p.top_p < 1.0:
            probs, ids = _sorted_head(torch.softmax(logits, dim=-1), p.top_p)
        else:
            return _inverse_cdf(torch.softmax(logits, dim=-1), gen)
        if p.top_p < 1.0:
            probs = probs * _top_p_keep(probs, p.top_p)
        return int(ids[_inverse_cdf(probs, gen)])
