"""The layout of one forward step: which sequences, how much each has cached, how many new tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpi_node.engine.limits import BLOCK_TOKENS
from tpi_node.proto import tpi_pb2 as pb


@dataclass(frozen=True)
class BatchLayout:
    """Tokens of a step are the concatenation, sequence by sequence, of each one's new tokens.

    T = sum(new_lens); hidden states of the step are [T, hidden]. Sequence s's new tokens sit at
    positions past_lens[s] .. past_lens[s] + new_lens[s] - 1.
    """

    seq_ids: tuple[int, ...]
    past_lens: tuple[int, ...]
    new_lens: tuple[int, ...]
    # each sequence's block table: the KV cache blocks of its tokens, in position order
    # (engine/kv_cache.py); the master's block pool fills them in (engine/blocks.py)
    block_tables: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not (len(self.seq_ids) == len(self.past_lens) == len(self.new_lens)):
            raise ValueError("batch layout lists differ in length")
        if self.block_tables and len(self.block_tables) != len(self.seq_ids):
            raise ValueError("batch layout has a block table count unlike its sequence count")
        if len(set(self.seq_ids)) != len(self.seq_ids):
            raise ValueError("a sequence appears twice in one step")
        if any(n < 1 for n in self.new_lens) or any(p < 0 for p in self.past_lens):
            raise ValueError("bad lengths in batch layout")

    @classmethod
    def one(cls, past: int, new: int, seq_id: int = 1) -> BatchLayout:
        """One sequence whose tokens sit in KV blocks 0, 1, 2, ... (tools and tests that drive a
        runner or a driver directly, outside the engine's block pool)."""
        return cls((seq_id,), (past,), (new,), (tuple(range(-(-(past + new) // BLOCK_TOKENS))),))

    @property
    def num_tokens(self) -> int:
        return sum(self.new_lens)

    def positions(self) -> torch.Tensor:
        """[T] absolute position of every token of the step."""
        return torch.cat([torch.arange(p, p + n) for p, n in zip(self.past_lens, self.new_lens)])

    def last_rows(self) -> list[int]:
        """Row index (in [T]) of each sequence's last new token."""
        rows, at = [], 0
        for n in self.new_lens:
            at += n
            rows.append(at - 1)
        return rows

    def split(self, cut: int) -> tuple[BatchLayout, BatchLayout]:
        """The step's rows [0, cut) and [cut, T) as two layouts (the token split, gpu/split.py).
        A sequence the cut goes through keeps its first tokens in the first part; in the second
        its remaining tokens come after them (past + the first part's), in the same blocks."""
        if not 0 < cut < self.num_tokens:
            raise ValueError(f"cannot split a step of {self.num_tokens} tokens at {cut}")
        parts: tuple[list, list] = ([], [])
        tables = self.block_tables or ((),) * len(self.seq_ids)
        at = 0
        for seq, past, n, table in zip(self.seq_ids, self.past_lens, self.new_lens, tables):
            first = min(max(cut - at, 0), n)  # how many of its rows fall before the cut
            if first:
                parts[0].append((seq, past, first, table))
            if n - first:
                parts[1].append((seq, past + first, n - first, table))
            at += n
        a, b = (BatchLayout(*zip(*p)) for p in parts)
        if not self.block_tables:
            a, b = (BatchLayout(x.seq_ids, x.past_lens, x.new_lens) for x in (a, b))
        return a, b

    def to_pb(self) -> pb.BatchLayout:
        return pb.BatchLayout(
            seq_ids=self.seq_ids,
            past_lens=self.past_lens,
            new_lens=self.new_lens,
            block_ids=[b for t in self.block_tables for b in t],
            table_lens=[len(t) for t in self.block_tables],
        )

    @classmethod
    def from_pb(cls, msg: pb.BatchLayout) -> BatchLayout:
        """Validated like any layout (ValueError on a malformed one)."""
        if sum(msg.table_lens) != len(msg.block_ids) or any(n < 0 for n in msg.table_lens):
            raise ValueError("batch layout: block table lengths do not add up to its block ids")
        ids, tables, at = list(msg.block_ids), [], 0
        for n in msg.table_lens:
            tables.append(tuple(ids[at : at + n]))
            at += n
        return cls(tuple(msg.seq_ids), tuple(msg.past_lens), tuple(msg.new_lens), tuple(tables))
