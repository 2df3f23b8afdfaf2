"""Speculative decoding with a draft model (--draft-model M) that the master runs alone.

The draft model is a whole model on the master's device: its own NodeRunner over a LocalCollective
(no network), its weights resident, its own paged KV cache and block pool, and its own head. It
must share the target's tokenizer (commands/compose.py refuses another). For each sequence of a
step it drafts k tokens greedily (argmax), all sequences batched into the same draft forwards: the
first forward feeds every token the draft has not seen (a new sequence's whole prompt, in chunks;
afterwards the last verified tokens), the next ones one draft token each.

Its KV follows each sequence: the draft keeps the tokens whose KV it holds (`_Fed.tokens`), and
before drafting compares them with the sequence's tokens; the KV of the first position where they
differ onward (drafts the target rejected) is overwritten as the sequence's real tokens are fed,
and the blocks past the agreeing prefix go back. A sequence that ends or is cancelled gives all of
its blocks back (`release`). Drafts are a hint: when the draft's cache is full, its context too
short, or its forward fails, a sequence drafts nothing that step and decodes one token, as plain
decoding would.

The engine (engine/engine.py) asks for the next step's drafts right after sampling a step, for every
sequence at once (`prepare`), so each scheduled sequence's `propose` finds them ready.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.blocks import BlockPool
from tpi_node.engine.head import ModelHead
from tpi_node.engine.limits import DEFAULT_LIMITS, EngineLimits
from tpi_node.engine.runner import NodeRunner
from tpi_node.engine.speculative import AdaptiveK
from tpi_node.model.config import ModelConfig

log = logging.getLogger("tpi_node.draft")


@dataclass
class _Fed:
    """What the draft's KV cache holds for one sequence: the KV of tokens[i] at position i."""

    tokens: list[int] = field(default_factory=list)
    sure: int = 0  # tokens[:sure] are the sequence's own tokens (known without comparing)


@dataclass
class _Job:
    """One sequence's drafting in one `prepare`."""

    drafter: ModelDrafter
    fed: _Fed
    k: int
    pending: list[int]  # its tokens the draft has not seen yet (fed before any draft)
    total: int  # len(tokens)
    drafts: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class DraftStats:
    forwards: int = 0
    tokens: int = 0  # fed through the draft model
    seconds: float = 0.0
    failures: int = 0


class DraftModel:
    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        runner: NodeRunner,
        head: ModelHead,
        *,
        vocab_limit: int | None = None,
        stop_ids: set[int] | frozenset[int] = frozenset(),
        limits: EngineLimits = DEFAULT_LIMITS,
    ) -> None:
        """`vocab_limit`: ids the target knows (a draft head with more rows never proposes the
        others); `stop_ids`: the target's end-of-sequence ids (nothing is drafted past one)."""
        self.name, self.cfg, self.runner, self.head, self.limits = name, cfg, runner, head, limits
        self.vocab_limit = min(head.vocab_size, vocab_limit or head.vocab_size)
        self.stop_ids = frozenset(stop_ids)
        self.pool = BlockPool(runner.kv.num_blocks, prefix_cache=False)
        self.max_len = min(cfg.max_position, self.pool.capacity_tokens)  # positions the draft can hold
        self.states: dict[int, _Fed] = {}
        self.stats = DraftStats()
        self._step_id = 0

    def drafter(self, seq_id: int) -> ModelDrafter:
        """A new sequence's drafter (it holds nothing until it first drafts)."""
        return ModelDrafter(model=self, seq_id=seq_id)

    # ---- drafting ----------------------------------------------------------------------------------
    def prepare(self, wants: list[tuple[ModelDrafter, list[int], int]]) -> None:
        """(drafter, the sequence's tokens, at most how many drafts): each drafter's drafts for
        these tokens, all sequences in the same forwards; its `propose(tokens)` then returns them."""
        jobs = []
        for d, tokens, k in wants:
            d.ready = (len(tokens), [])  # nothing, unless drafted below
            k = min(k, self.max_len - len(tokens) + 1)  # the last draft's position is never fed
            if k <= 0 or not tokens:
                continue
            fed = self._follow(d.seq_id, tokens, len(tokens) + k - 1)
            if fed is not None:
                jobs.append(_Job(d, fed, k, tokens[len(fed.tokens) :], len(tokens)))
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                while self._forward([j for j in jobs if not j.done]):
                    pass
        except Exception as e:  # drafts are a hint: this step decodes without them
            self.stats.failures += 1
            log.warning("the draft model failed (no drafts this step): %s", e)
            for j in jobs:
                j.drafts = []
        finally:
            self.stats.seconds += time.perf_counter() - t0
        for j in jobs:
            j.drafter.ready = (j.total, j.drafts)

    def _follow(self, seq_id: int, tokens: list[int], need: int) -> _Fed | None:
        """Roll the sequence's draft KV back to where it agrees with `tokens` (at least the last
        token is fed again, for its logits) and hold blocks for `need` positions; None when the
        draft's cache has no room for it now."""
        fed = self.states.get(seq_id)
        if fed is None:
            if self.pool.admit(seq_id, tokens, need=need, reuse=False) is None:
                return None
            fed = self.states[seq_id] = _Fed()
        else:
            p, n = fed.sure, min(len(fed.tokens), len(tokens))
            while p < n and fed.tokens[p] == tokens[p]:
                p += 1
            del fed.tokens[min(p, len(tokens) - 1) :]
            fed.sure = len(fed.tokens)
            self.pool.trim(seq_id, len(fed.tokens))
            if not self.pool.grow(seq_id, need):
                return None
        return fed

    def _forward(self, jobs: list[_Job]) -> bool:
        """One draft forward: each job feeds a chunk of what it has not seen, else its last draft
        (within the step's token budget). False when no job is left."""
        budget, step = self.limits.max_step_tokens, []
        for j in jobs:
            if budget <= 0:
                break
            chunk = j.pending[: min(budget, self.limits.prefill_chunk)] if j.pending else j.drafts[-1:]
            step.append((j, chunk))
            budget -= len(chunk)
        if not step:
            return False
        layout = BatchLayout(
            tuple(j.drafter.seq_id for j, _ in step),
            tuple(len(j.fed.tokens) for j, _ in step),
            tuple(len(c) for _, c in step),
            tuple(self.pool.table(j.drafter.seq_id) for j, _ in step),
        )
        self._step_id += 1
        hidden = self.runner.forward(layout, self.head.embed([t for _, c in step for t in c]), self._step_id)
        self.stats.forwards += 1
        self.stats.tokens += layout.num_tokens
        rows, ends = [], []
        for (j, chunk), row in zip(step, layout.last_rows()):
            j.fed.tokens += chunk
            if j.pending:
                del j.pending[: len(chunk)]
                if j.pending:
                    continue  # more of its tokens first
                j.fed.sure = j.total  # it holds every token of the sequence now
            rows.append(row)
            ends.append(j)
        if rows:
            logits = self.head.logits(hidden[rows])  # [B, V]
            if self.vocab_limit < logits.shape[-1]:
                logits[:, self.vocab_limit :] = float("-inf")
            for j, token in zip(ends, logits.argmax(-1).tolist()):
                j.drafts.append(token)
                j.done = len(j.drafts) >= j.k or token in self.stop_ids
        return True

    # ---- bookkeeping -------------------------------------------------------------------------------
    def release(self, seq_id: int) -> None:
        """The sequence ended: its draft KV blocks go back."""
        if self.states.pop(seq_id, None) is not None:
            self.pool.release(seq_id)

    def blocks_used(self) -> int:
        return self.pool.used()

    def stats_dict(self) -> dict:
        s = self.stats
        return {
            "model": self.name,
            "blocks": self.pool.num_blocks,
            "used": self.pool.used(),
            "sequences": len(self.states),
            "forwards": s.forwards,
            "tokens": s.tokens,
            "seconds": s.seconds,
            "failures": s.failures,
        }

    def close(self) -> None:
        self.runner.close()


@dataclass
class ModelDrafter(AdaptiveK):
    """One sequence's drafter over the shared DraftModel (the Drafter interface)."""

    model: DraftModel | None = None
    seq_id: int = 0
    ready: tuple[int, list[int]] | None = None  # (len(tokens), drafts) from the last prepare

    def propose(self, tokens: list[int]) -> list[int]:
        """The drafts `prepare` made for these tokens; drafted now, alone, when it was not asked."""
        if self.ready is None or self.ready[0] != len(tokens):
            self.model.prepare([(self, tokens, self.k)])
        return list(self.ready[1][: self.k])

    def release(self) -> None:
        self.ready = None
        self.model.release(self.seq_id)


def vocab_difference(target, draft) -> str | None:
    """None when the two tokenizers (model/tokenizer.py) give every id the same token, else where
    they differ first (a draft model must share the target's token ids)."""
    if target.vocab_size != draft.vocab_size:
        return f"{draft.vocab_size} tokens, the target's tokenizer has {target.vocab_size}"
    for i in range(target.vocab_size):
        a, b = target.id_to_token(i), draft.id_to_token(i)
        if a != b:
            return f"token {i} is {b!r}, the target's is {a!r}"
    return None
