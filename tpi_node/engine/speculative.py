"""Speculative decoding: the drafters, and prompt lookup (draft tokens from the sequence's own text).

A decode step feeds a sequence's last token and, after it, k draft tokens - by prompt lookup, the
tokens that followed the most recent earlier occurrence of its last n tokens (n = MAX_NGRAM down to
1); by a draft model, its greedy continuation (engine/draft.py). The cluster runs
the k + 1 tokens in one step - on a cluster whose links add latency a step costs about what a
one-token step costs - and the engine samples row after row, as plain decoding would, for as long as
the sampled token equals the draft that follows it (engine/engine.py, `_verify`). Every token is
still drawn from the model's own distribution with the request's generator, one draw per token, so
greedy and seeded output is the text of plain decoding; the KV of rejected drafts is simply
overwritten later (their blocks are trimmed).

k adapts per sequence: all drafts accepted doubles it (up to K_MAX), a rejection sets it to one
more than what was accepted.

A drafter is anything with the Drafter interface; the engine gives each sequence its own. Two
exist: PromptLookup here, and the draft model's (engine/draft.py, --draft-model), which the master
runs alone and which drafts the tokens it would itself pick greedily. The verification is the same
for both and exact for any deterministic drafter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

MAX_NGRAM = 3  # the longest suffix looked up
K_START, K_MAX = 4, 8


class Drafter(Protocol):
    k: int  # the drafts it proposes at most, now

    def propose(self, tokens: list[int]) -> list[int]:
        """Up to k tokens that may follow `tokens` (the sequence's prompt and generated text)."""

    def record(self, proposed: int, accepted: int) -> None:
        """How the last drafts fared (k adapts)."""

    def release(self) -> None:
        """The sequence ended (finished, cancelled, failed): give back what it holds."""


@dataclass
class AdaptiveK:
    """The k rule every drafter shares."""

    k: int = K_START

    def record(self, proposed: int, accepted: int) -> None:
        """Adapt k to how the last drafts fared."""
        if proposed:
            self.k = min(K_MAX, 2 * self.k) if accepted == proposed else max(1, accepted + 1)


@dataclass
class PromptLookup(AdaptiveK):
    """One sequence's n-gram index: for every n-gram seen, the position right after its latest
    occurrence that is not the sequence's own suffix. Grows with the tokens (O(new tokens) per step)."""

    _index: dict[tuple[int, ...], int] = field(default_factory=dict)
    _indexed: int = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: list[int]) -> list[int]:
        """Up to k tokens that may follow `tokens` ([] when its suffix was not seen before)."""
        last = len(tokens) - 1  # n-grams ending here are the suffix itself: looked up, not indexed
        for end in range(self._indexed, last):
            for n in range(1, MAX_NGRAM + 1):
                if end + 1 >= n:
                    self._index[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self._indexed = max(self._indexed, last)
        for n in range(MAX_NGRAM, 0, -1):
            if len(tokens) >= n:
                at = self._index.get(tuple(tokens[-n:]))
                if at is not None:
                    return tokens[at : at + self.k]
        return []

    def release(self) -> None:
        pass  # it holds nothing outside itself
