"""The split head's step (--head-split): the lm_head's rows are spread over the nodes by
vocabulary (NodeShare.vocab_rows), so after the layer loop every node (the master too) turns the
rows the master asked for into its slice of the logits and returns only what sampling needs
(model/candidates.py: its best candidates, its log-sum-exp, its Gumbel-max); the master gathers
them (one exact, fp32 gather: Collective.gather) and merges. Rows that need the whole row of
logits (penalties, top-p over the vocabulary, grammar masks) gather their slices instead.

    ask = HeadAsk(rows=(3,), asks=(RowAsk(k=1),))       # the master, for the step's sampled rows
    result = vocab_step(shard, h, ask, coll, ranges)     # every node; None on the workers
    result.candidates[0].ids[0]                           # greedy: the best id of the vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi_node.comm.codec import FrameError
from tpi_node.comm.collective import Collective
from tpi_node.engine.head import VocabShard
from tpi_node.model.candidates import Candidates, RowAsk, merge, pack_rows, width
from tpi_node.proto import tpi_pb2 as pb

HEAD_SPLIT_MIN_PARAMS = 64_000_000  # --head-split auto splits an lm_head of at least this many


def choose_head_split(mode: str, vocab: int, hidden: int, nodes: int, star: bool = True) -> tuple[bool, str]:
    """--head-split auto|on|off -> (split?, the line the master says at start). A split costs one
    gather per step (a worker-to-master hop) and saves (N-1)/N of the master's lm_head time, which
    grows with vocab x hidden: Llama-3.2-1B's 263M parameters took ~80 ms a token in fp32 on 2 cores.
    Only the star gathers (`star`: the partial sums go through the master; a gloo ring or an NVLink
    group keeps the head whole)."""
    params = vocab * hidden
    size = f"{params / 1e6:.0f}M parameters"
    if not star and mode != "off":
        return False, f"lm_head: on the master ({size}; only the gRPC star splits it)"
    split = mode == "on" or (mode == "auto" and nodes > 1 and params >= HEAD_SPLIT_MIN_PARAMS)
    if split:
        return True, f"lm_head: split by vocabulary over the nodes ({size}; --head-split {mode})"
    why = f"under {HEAD_SPLIT_MIN_PARAMS // 10**6}M" if mode == "auto" else f"--head-split {mode}"
    why = "one node" if nodes < 2 and mode == "auto" else why
    return False, f"lm_head: on the master ({size}; {why})"


@dataclass(frozen=True)
class HeadAsk:
    """rows: the step's rows (of T) whose candidates are wanted, with one RowAsk each;
    full_rows: the rows whose whole logits are wanted."""

    rows: tuple[int, ...] = ()
    asks: tuple[RowAsk, ...] = ()
    full_rows: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rows or self.full_rows)

    def to_pb(self) -> pb.HeadAsk:
        a = self.asks
        return pb.HeadAsk(
            rows=self.rows,
            k=[x.k for x in a],
            gumbel=[x.gumbel for x in a],
            temperature=[x.temperature for x in a],
            seed=[x.seed for x in a],
            draw=[x.draw for x in a],
            target=[x.target for x in a],
            full_rows=self.full_rows,
        )

    @classmethod
    def from_pb(cls, msg: pb.HeadAsk, num_rows: int) -> HeadAsk:
        """FrameError when the fields disagree in length or name a row the step does not have."""
        n = len(msg.rows)
        if any(len(f) != n for f in (msg.k, msg.gumbel, msg.temperature, msg.seed, msg.draw, msg.target)):
            raise FrameError("the master's head ask has fields of different lengths")
        if any(r >= num_rows for r in [*msg.rows, *msg.full_rows]) or any(k < 1 for k in msg.k):
            raise FrameError(f"the master's head ask names a row out of the step's {num_rows} or asks for no candidate")
        if any(not t > 0 for t, g in zip(msg.temperature, msg.gumbel) if g):
            raise FrameError("the master's head ask has a Gumbel draw without a positive temperature")
        asks = tuple(
            RowAsk(int(k), bool(g), float(t), int(s), int(d), int(x))
            for k, g, t, s, d, x in zip(msg.k, msg.gumbel, msg.temperature, msg.seed, msg.draw, msg.target)
        )
        return cls(tuple(msg.rows), asks, tuple(msg.full_rows))


@dataclass
class HeadResult:
    """The master's answer to a HeadAsk: Candidates per `rows` entry, and [len(full_rows), V]
    float32 logits."""

    candidates: list[Candidates]
    full: torch.Tensor


def sizes(ask: HeadAsk, ranges: list[tuple[int, int]]) -> list[int]:
    """Floats each rank sends for `ask` (rank r holds vocabulary rows ranges[r])."""
    w = width(list(ask.asks))
    return [(len(ask.rows) * w if b > a else 0) + len(ask.full_rows) * (b - a) for a, b in ranges]


def vocab_step(
    shard: VocabShard, h: torch.Tensor, ask: HeadAsk, coll: Collective, ranges: list[tuple[int, int]]
) -> HeadResult | None:
    """h [T, H]: the step's final-normed hidden states (the same on every node). Every rank of
    the plan calls this with the same ask; the master gets the merged result, a worker None."""
    asks, parts = list(ask.asks), []
    if shard.end > shard.start:
        if ask.rows:
            parts.append(pack_rows(shard.logits(h[list(ask.rows)]), shard.start, asks).reshape(-1))
        if ask.full_rows:
            parts.append(shard.logits(h[list(ask.full_rows)]).reshape(-1))
    mine = torch.cat(parts) if parts else torch.empty(0)
    gathered = coll.gather(mine, sizes(ask, ranges))
    if gathered is None:
        return None
    packs, full, n = [], [], len(ask.rows) * width(asks)
    for (a, b), got in zip(ranges, gathered):
        if b > a:
            packs.append(got[:n])
            full.append(got[n:].reshape(len(ask.full_rows), b - a))
    candidates = merge(packs, asks) if ask.rows else []
    return HeadResult(candidates, torch.cat(full, dim=1))


# ---- the engine's side: which rows of a step to ask for, and whose answers they are -----------
Row = Candidates | torch.Tensor  # a sampled row's answer: merged candidates, or its whole logits [V]


@dataclass
class StepAsk:
    """A step's HeadAsk and where each answer goes: `sampled[seq_id]` lists, per sampled row of the
    sequence (its last token, then each draft), (whole row?, index into the result's candidates
    or full rows); `prompt[seq_id]`: (prompt position, candidates index) of its prompt logprobs."""

    ask: HeadAsk
    sampled: dict[int, list[tuple[bool, int]]]
    prompt: dict[int, list[tuple[int, int]]]

    def rows_of(self, seq_id: int, result: HeadResult) -> list[Row]:
        return [result.full[i] if whole else result.candidates[i] for whole, i in self.sampled[seq_id]]


def step_ask(work, vocab: int) -> StepAsk:
    """The split head's ask for a step's `work` ([(Sequence, chunk)], in the step's row order):
    every row whose next token is sampled (a grammar or Sampler.ask saying so: its whole row), and
    every prompt row whose logprob is wanted and not yet known (its prompt token is the target)."""
    rows, asks, full = [], [], []
    sampled, prompt = {}, {}
    at = 0
    for s, chunk in work:
        past, first, at = s.cached, at, at + len(chunk)  # the chunk's rows: positions past .. past + len - 1
        if s.prompt_lps is not None:
            k = max(1, s.params.prompt_logprobs or 0)
            for j in range(min(len(chunk), s.num_prompt - 1 - past)):
                if s.prompt_lps[past + 1 + j] is None:
                    prompt.setdefault(s.seq_id, []).append((past + 1 + j, len(rows)))
                    rows.append(first + j)
                    asks.append(RowAsk(k=k, target=s.tokens[past + 1 + j]))
        if s.prefill_only or past + len(chunk) - len(s.draft) != len(s.tokens):
            continue  # its last known token is not in this chunk: nothing to sample yet
        outs = sampled[s.seq_id] = []
        for i, r in enumerate(range(at - 1 - len(s.draft), at)):  # the last token's row, then the drafts'
            a = None if s.constraint is not None else s.sampler.ask(len(s.generated) + i, vocab)
            if a is None:
                outs.append((True, len(full)))
                full.append(r)
            else:
                outs.append((False, len(rows)))
                rows.append(r)
                asks.append(a)
    return StepAsk(HeadAsk(tuple(rows), tuple(asks), tuple(full)), sampled, prompt)
