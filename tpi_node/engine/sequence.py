"""A sequence in the engine: its tokens, how many are in every node's KV cache, its sampler and
detokeniser, and where its events go."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from tpi_node.engine.client import TokenEvent
from tpi_node.engine.speculative import Drafter
from tpi_node.model.grammar import TokenConstraint
from tpi_node.model.sampling import Sampler
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.model.tokenizer import IncrementalDecoder, StopMatcher


class AsyncSink:
    """Events to the asyncio task that awaits them, posted thread-safely from the step thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.q = loop, asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the loop is closed: the client is gone
            pass


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    tokens: list[int]  # prompt + generated so far
    num_prompt: int
    params: SamplingParams
    sampler: Sampler
    decoder: IncrementalDecoder
    stopper: StopMatcher
    sink: AsyncSink
    cached: int = 0  # tokens already in every node's KV cache
    cached_prompt: int | None = None  # prompt tokens the prefix cache held at first admission
    finished: bool = False
    cancelled: bool = False
    t_arrive: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    node_counters: dict = field(default_factory=dict)  # every node's counters when it arrived
    constraint: TokenConstraint | None = None  # the grammar its output follows, if any
    pooling: bool = False  # an embedding: pool the prompt's final hidden states, sample nothing
    pooled: torch.Tensor | None = None  # [H] float32 sum of the hidden states of positions < pooled_upto
    pooled_upto: int = 0
    # prompt logprobs by position ([0] stays None), filled as prefill chunks go through; handed to
    # the first event and then None. Filled by position, so a recomputed chunk does not add twice.
    prompt_lps: list | None = None
    drafter: Drafter | None = None  # speculative decoding (None: one token per step)
    max_len: int = 1 << 62  # the longest it may grow (the engine's context): drafts stay within
    draft: list[int] = field(default_factory=list)  # the draft tokens in this step's chunk
    drafts_proposed: int = 0
    drafts_accepted: int = 0

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_lps = [None] * self.num_prompt

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def prefill_only(self) -> bool:
        """Ends when its prompt is computed, with one event that carries no token."""
        return self.pooling or self.params.max_tokens == 0

    @property
    def every_row(self) -> bool:
        """It still needs the hidden state of every prompt position, so it may not take its prefix
        from the prefix cache (whose rows are not computed again)."""
        return self.pooling or self.prompt_lps is not None

    def next_chunk(self, budget: int) -> list[int]:
        """The tokens this sequence feeds into the next step: a prefill chunk, or the token to
        decode followed by the drafts to check (engine/speculative.py), within `budget`, its
        max_tokens and max_len."""
        chunk = self.tokens[self.cached : self.cached + budget]
        self.draft = []
        if self.drafter is not None and self.cached == len(self.tokens) - 1 and self.constraint is None:
            room = self.draft_room(budget)
            if room > 0:
                self.draft = self.drafter.propose(self.tokens)[:room]
        return chunk + self.draft

    def draft_room(self, budget: int) -> int:
        """How many drafts its next decode step may check: within the step's `budget`, its
        max_tokens and max_len (the last token it may still generate is never a draft)."""
        if self.prefill_only:
            return 0
        return min(budget - 1, self.params.max_tokens - len(self.generated) - 1, self.max_len - len(self.tokens) - 1)

    def emit(self, event: TokenEvent) -> None:
        if self.prompt_lps is not None:  # the first event carries the prompt's logprobs
            event.prompt_logprobs, self.prompt_lps = self.prompt_lps, None
        self.sink.put(event)
