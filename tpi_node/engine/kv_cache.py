"""The paged KV cache of the heads a node holds.

Per layer, keys and values live in two pools [num_blocks * BLOCK_TOKENS, n_kv, hd], allocated once
(their size is the memory budget's, engine/budget.py): no rectangle of slots, no doubling copy.
Which blocks hold a sequence's tokens is decided by the master (engine/blocks.py) and comes with
every step as the sequence's block table; token p of a sequence sits at slot
table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS. A node keeps no per-sequence state.

    kv.begin(layout)                  # once per step: slots of the new tokens, gather indices
    cache = kv.layer(i)               # what attention_partial sees
    cache.store(k, v)                 # the step's new keys/values, all sequences at once
    ks, vs, mask = cache.decode_kv()  # every one-token sequence of the step: [B, n_kv, L, hd]
    ks, vs = cache.sequence_kv(j)     # a prefill chunk's sequence: [n_kv, past + n, hd]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.limits import BLOCK_TOKENS


@dataclass
class StepIndex:
    """Where one step's tokens go and what each sequence attends to (the same for every layer)."""

    slots: torch.Tensor  # [T] pool slot of every new token
    decode: list[int]  # indices (in the layout) of the one-token sequences
    decode_rows: torch.Tensor | None  # [B] the row of each one's token among the step's T
    decode_slots: torch.Tensor | None  # [B, L] slots of each decode sequence's tokens (padded)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where a slot holds a real token
    decode_lens: torch.Tensor | None  # [B] tokens each decode sequence attends to (past + 1)
    seq_slots: dict[int, torch.Tensor]  # layout index -> [past + n] slots of a prefill sequence


class PagedKVCache:
    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype, device, num_blocks: int) -> None:
        self.num_layers, self.n_kv, self.head_dim, self.num_blocks = num_layers, n_kv, head_dim, num_blocks
        self.dtype, self.device = dtype, torch.device(device)
        # One slot past the blocks stays zero: the padding of a decode batch's shorter sequences
        # reads it (masked out; a never-written slot could hold NaN, and 0 x NaN is NaN).
        self.null_slot = num_blocks * BLOCK_TOKENS
        shape = (self.null_slot + 1, n_kv, head_dim)
        # torch.empty: a CPU page is taken only when a block is first written (the budget counts all)
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        for t in self.k + self.v:
            t[self.null_slot].zero_()
        self.index: StepIndex | None = None

    def nbytes(self) -> int:
        """Bytes of the pools (what the budget reserved for this node's KV)."""
        return 2 * self.num_layers * self.num_blocks * BLOCK_TOKENS * self.n_kv * self.head_dim * self.dtype.itemsize

    def begin(self, layout: BatchLayout) -> None:
        """Index the step's block tables once; ValueError when a table does not cover its tokens."""
        dev, tables = self.device, layout.block_tables
        if len(tables) != len(layout.seq_ids):
            raise ValueError(f"the step has {len(tables)} block tables for {len(layout.seq_ids)} sequences")
        for seq, table, past, n in zip(layout.seq_ids, tables, layout.past_lens, layout.new_lens):
            if len(table) * BLOCK_TOKENS < past + n:
                raise ValueError(
                    f"sequence {seq}: its block table holds {len(table) * BLOCK_TOKENS} tokens, "
                    f"the step needs {past + n}"
                )
            if table and (min(table) < 0 or max(table) >= self.num_blocks):
                raise ValueError(f"sequence {seq}: block ids outside 0..{self.num_blocks - 1}")
        width = max(len(t) for t in tables)
        table = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], device=dev)  # [S, width]
        # the new tokens: sequence s's positions past_s .. past_s + n_s - 1, all sequences at once
        owner = torch.repeat_interleave(
            torch.arange(len(tables), device=dev), torch.tensor(layout.new_lens, device=dev)
        )  # [T]
        pos = layout.positions().to(dev)
        slots = _slot(table[owner, pos // BLOCK_TOKENS], pos)
        decode = [j for j, n in enumerate(layout.new_lens) if n == 1]
        decode_slots = decode_mask = lens = rows = None
        if decode:
            starts = [0, *itertools.accumulate(layout.new_lens)]
            rows = torch.tensor([starts[j] for j in decode], device=dev)  # [B]
            lens = torch.tensor([layout.past_lens[j] + 1 for j in decode], device=dev)  # [B]
            at = torch.arange(int(lens.max()), device=dev)  # [L]
            real = at[None, :] < lens[:, None]  # [B, L]
            # [B, L]; past a sequence's end the padding reads the zero slot (and is masked out)
            decode_slots = torch.where(real, _slot(table[decode][:, at // BLOCK_TOKENS], at), self.null_slot)
            decode_mask = real[:, None, None, :]
        seq_slots = {}
        for j, (p, n) in enumerate(zip(layout.past_lens, layout.new_lens)):
            if n > 1:
                at = torch.arange(p + n, device=dev)
                seq_slots[j] = _slot(table[j, at // BLOCK_TOKENS], at)
        self.index = StepIndex(slots, decode, rows, decode_slots, decode_mask, lens, seq_slots)

    def layer(self, i: int, index: StepIndex | None = None) -> LayerKV:
        """Layer i as indexed by the last `begin`, or by `index` (one half of a split step)."""
        return LayerKV(self, i, index)


def _slot(blocks: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Pool slot of each position: `blocks` holds the block id of every position's block (same shape)."""
    return blocks * BLOCK_TOKENS + pos % BLOCK_TOKENS


class LayerKV:
    """What attention_partial sees of the cache: one layer, indexed for the current step."""

    __slots__ = ("k", "v", "index")

    def __init__(self, cache: PagedKVCache, i: int, index: StepIndex | None = None) -> None:
        self.k, self.v, self.index = cache.k[i], cache.v[i], index or cache.index

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, n_kv, hd] of every new token of the step."""
        self.k[self.index.slots] = k
        self.v[self.index.slots] = v

    def decode_kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values [B, n_kv, L, hd] of the decode sequences (L = the longest), and the mask
        [B, 1, 1, L]. One gather for the whole batch, so attention is one call."""
        idx = self.index.decode_slots
        return self.k[idx].transpose(1, 2), self.v[idx].transpose(1, 2), self.index.decode_mask

    def sequence_kv(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys/values [n_kv, past + n, hd] of the prefill sequence at layout index j."""
        idx = self.index.seq_slots[j]
        return self.k[idx].transpose(0, 1), self.v[idx].transpose(0, 1)
