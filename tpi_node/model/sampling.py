"""Next-token choice for one sequence: penalties, greedy or temperature/top-k/top-p sampling.

Order (as vLLM and HF apply it): repetition penalty over prompt + generated ids, OpenAI
presence/frequency penalties over generated ids, then argmax when greedy, else temperature,
top-k, top-p and a Gumbel-max draw whose noise depends only on (seed, token index, token id)
(model/candidates.py: same seed -> same tokens, whole row or split head).
Reported logprobs are those of the model's own distribution (log_softmax of the raw logits,
vLLM's default), not of the penalized/truncated one.

Cost per call: O(vocab) elementwise work plus at most one sort (top-p without top-k);
with top-k, top-p runs on the k sorted values torch.topk already returns.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from tpi_node.model.candidates import Candidates, RowAsk, gumbel_choice, logprob, top_candidates
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


MAX_CANDIDATES = 256  # a split head returns at most this many best ids per row (top-k, logprobs)


class Sampler:
    """One per sequence: its seed and its penalty bookkeeping.

    Every non-greedy draw is a Gumbel-max with noise that depends only on (seed, draw, token id)
    (model/candidates.py), where `draw` is the index of the token in the generated text. So a
    sequence samples the same tokens whether it draws from the whole row of logits (`__call__`)
    or from the candidates a split head merged (`choose`), whatever the step it lands in."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]) -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        # Penalty state, built on the first call (vocab and device come with the logits) and
        # extended with each new generated id.
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._n_recorded = 0

    def _top_k(self, vocab: int) -> int:
        """The top-k in force (0: none)."""
        k = self.params.top_k
        return k if 0 < k < vocab else 0

    def ask(self, draw: int, vocab: int) -> RowAsk | None:
        """What a split head must return for this sequence's next token (draw `draw`), or None:
        the whole row is needed (penalties, top-p over the whole vocabulary, a wide top-k)."""
        p, top_k = self.params, self._top_k(vocab)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            return None
        if (p.top_p < 1.0 and not top_k and not p.greedy) or max(top_k, p.logprobs or 0) > MAX_CANDIDATES:
            return None
        sampled = not p.greedy
        k = max(1, p.logprobs or 0, top_k if sampled else 0)
        return RowAsk(k, sampled and not top_k, max(p.temperature, 1e-6), self.seed, draw)

    def __call__(self, logits: torch.Tensor, generated_ids: list[int]) -> SampleResult:
        """logits [vocab] (float32, -inf where a grammar forbids) of the next position;
        generated_ids so far (no prompt)."""
        p = self.params
        logits = logits.float().reshape(-1)
        logprobs = torch.log_softmax(logits, dim=-1)
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            seen, counts = self._penalty_state(logits, generated_ids)
            logits = penalize(logits, seen, counts, p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            token = int(torch.argmax(logits))
        else:
            token = self._draw(logits, len(generated_ids))
        top = None
        if p.logprobs:
            vals, ids = torch.topk(logprobs, min(p.logprobs, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), vals.tolist()))
        return SampleResult(token, float(logprobs[token]), top)

    def choose(self, c: Candidates, generated_ids: list[int], vocab: int) -> SampleResult:
        """The next token from a split head's merged candidates for `ask(len(generated_ids))`."""
        p, top_k = self.params, self._top_k(vocab)
        if p.greedy:
            token, logit = c.ids[0], c.logits[0]
        elif top_k:
            ids = torch.tensor(c.ids[:top_k], dtype=torch.int64)
            token = self._among(torch.tensor(c.logits[:top_k]), ids, len(generated_ids))
            logit = c.logits[c.ids.index(token)]
        else:
            token, logit = c.gumbel_id, c.gumbel_logit
        top = None
        if p.logprobs:
            top = [(i, logprob(v, c.lse)) for i, v in zip(c.ids[: p.logprobs], c.logits[: p.logprobs])]
        return SampleResult(token, logprob(logit, c.lse), top)

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

    def _ask(self, draw: int) -> RowAsk:
        return RowAsk(temperature=max(self.params.temperature, 1e-6), seed=self.seed, draw=draw)

    def _among(self, vals: torch.Tensor, ids: torch.Tensor, draw: int) -> int:
        """Draw among the top-k candidates (best first), top-p applied to their renormalized
        probabilities."""
        p = self.params
        if p.top_p < 1.0:
            keep = _top_p_keep(torch.softmax(vals / p.temperature, dim=-1), p.top_p)
            vals, ids = vals[keep], ids[keep]
        return gumbel_choice(vals, ids, self._ask(draw))

    def _draw(self, logits: torch.Tensor, draw: int) -> int:
        """logits [vocab] (penalized) -> a sampled token id: temperature, top-k, top-p."""
        p = self.params
        if self._top_k(logits.shape[-1]):
            vals, ids = top_candidates(logits, p.top_k)
            return self._among(vals, ids, draw)
        ids = torch.arange(logits.shape[-1], dtype=torch.int64, device=logits.device)
        if p.top_p < 1.0:
            probs, order = _sorted_head(torch.softmax(logits / p.temperature, dim=-1), p.top_p)
            ids = order[_top_p_keep(probs, p.top_p)]
        return gumbel_choice(logits[ids], ids, self._ask(draw))
