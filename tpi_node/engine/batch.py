"""The layout of one forward step: which sequences, how much each has cached, how many new tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def __post_init__(self) -> None:
        if not (len(self.seq_ids) == len(self.past_lens) == len(self.new_lens)):
            raise ValueError("batch layout lists differ in length")
        if len(set(self.seq_ids)) != len(self.seq_ids):
            raise ValueError("a sequence appears twice in one step")
        if any(n < 1 for n in self.new_lens) or any(p < 0 for p in self.past_lens):
            raise ValueError("bad lengths in batch layout")

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

    def to_pb(self) -> pb.BatchLayout:
        return pb.BatchLayout(seq_ids=self.seq_ids, past_lens=self.past_lens, new_lens=self.new_lens)

    @classmethod
    def from_pb(cls, msg: pb.BatchLayout) -> BatchLayout:
        """Validated like any layout (ValueError on a malformed one)."""
        return cls(tuple(msg.seq_ids), tuple(msg.past_lens), tuple(msg.new_lens))
