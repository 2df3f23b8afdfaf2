"""The scheduler: which sequences run, and what each feeds into the next step.

It owns the queues and the KV block pool (engine/blocks.py). A waiting sequence is admitted, in
arrival order, only when its tokens' blocks can be had (the head of the queue waits rather than be
overtaken); its cached prefix counts as computed at once. Each step takes every running sequence's
next token first (latency), then prefill chunks within the step's token budget. When a decoding
sequence needs a block and none is left, the newest running sequence is preempted: its blocks go
back and it waits again at the front of the queue, to be recomputed (prefix cache included) later.
The oldest running sequence is never preempted, so one always makes progress.
"""

from __future__ import annotations

import collections

from tpi_node.engine.blocks import BlockPool
from tpi_node.engine.limits import EngineLimits
from tpi_node.engine.sequence import Sequence

Work = list[tuple[Sequence, list[int]]]  # (sequence, the tokens it feeds into the step)


class Scheduler:
    def __init__(self, limits: EngineLimits, num_blocks: int, prefix_cache: bool = True) -> None:
        self.limits, self.prefix_cache = limits, prefix_cache
        self.pool = BlockPool(num_blocks, prefix_cache)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def reset(self, num_blocks: int) -> None:
        """Every node's KV cache is new (a re-plan, a node back): drop the pool and the prefix
        cache; running sequences wait again, first, and recompute what they had."""
        for s in reversed(self.running):
            s.cached = 0
            self.waiting.appendleft(s)
        self.running.clear()
        self.pool = BlockPool(num_blocks, self.prefix_cache)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """The sequence ended or was cancelled: its blocks go back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.seq_id)

    def schedule(self) -> Work:
        self._admit()
        budget, work = self.limits.max_step_tokens, []
        for s in sorted(self.running, key=lambda s: len(s.tokens) - s.cached > 1):  # decode first
            if budget <= 0:
                break
            if s not in self.running:  # preempted for an earlier one of this step
                continue
            chunk = s.next_chunk(min(budget, self.limits.prefill_chunk))
            if s.draft and not self.pool.grow(s.seq_id, s.cached + len(chunk)):
                chunk, s.draft = chunk[: len(chunk) - len(s.draft)], []  # drafts never preempt anyone
            if not self._make_room(s, s.cached + len(chunk), work):
                continue
            work.append((s, chunk))
            budget -= len(chunk)
        return work

    def tables(self, work: Work) -> tuple[tuple[int, ...], ...]:
        return tuple(self.pool.table(s.seq_id) for s, _ in work)

    def computed(self, work: Work) -> None:
        """The step went through every layer: its tokens are in every node's cache (its drafts
        only once they are accepted)."""
        for s, chunk in work:
            s.cached += len(chunk) - len(s.draft)
            self.pool.computed(s.seq_id, s.tokens, s.cached)

    def accepted(self, s: Sequence, n: int) -> None:
        """n of s's drafts were accepted (they are the tokens after its cached ones now): their KV
        counts; the blocks that only held rejected drafts go back."""
        s.cached += n
        self.pool.computed(s.seq_id, s.tokens, s.cached)
        self.pool.trim(s.seq_id, len(s.tokens))

    # ---- admission and preemption ----------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.limits.max_running:
            s = self.waiting[0]
            hit = self.pool.admit(s.seq_id, s.tokens, need=len(s.tokens), reuse=not s.every_row)
            if hit is None:
                return
            self.waiting.popleft()
            s.cached = hit
            if s.cached_prompt is None:  # what the request saved, as its first admission found it
                s.cached_prompt = hit
            self.running.append(s)

    def _make_room(self, s: Sequence, tokens: int, work: Work) -> bool:
        """Blocks for `s`'s first `tokens` tokens, preempting the newest other sequences if needed.
        False when `s` itself had to wait (it was the newest)."""
        while not self.pool.grow(s.seq_id, tokens):
            victim = self.running[-1]
            self._preempt(victim, work)
            if victim is s:
                return False
        return True

    def _preempt(self, victim: Sequence, work: Work) -> None:
        self.running.remove(victim)
        self.pool.release(victim.seq_id)
        victim.cached = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1
        for i, (s, _) in enumerate(work):
            if s is victim:
                del work[i]
                break
