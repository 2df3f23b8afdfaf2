"""KV cache of the heads a node holds.

Every sequence owns a slot; per layer, keys and values live in one tensor [slots, n_kv, cap, hd]
(grown by doubling, slots reused after a sequence ends). One tensor per layer lets a decode step
attend for all its sequences in ONE kernel call (a length mask hides each slot's unused tail)
instead of one call per sequence.
"""

from __future__ import annotations

import torch

from tpi_node.engine.batch import BatchLayout


class KVCache:
    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype, device="cpu") -> None:
        self.num_layers, self.n_kv, self.head_dim = num_layers, n_kv, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.slots = 0  # slot capacity of the tensors
        self.cap = 0  # token capacity per slot
        self.slot_of: dict[int, int] = {}
        self.lens: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._decode_key: tuple | None = None  # the step decode_index was built for
        self._decode_index = None

    def length(self, seq_id: int) -> int:
        return self.lens.get(seq_id, 0)

    def reserve(self, layout: BatchLayout) -> None:
        """Make room for a step: a slot for every new sequence, capacity for the longest one."""
        self._decode_key = None  # slots may move between steps (a replayed sequence)
        for seq in layout.seq_ids:
            if seq not in self.slot_of:
                self.slot_of[seq] = self._free_slots.pop() if self._free_slots else len(self.slot_of)
                self.lens[seq] = 0
        need_slots = max(self.slot_of.values()) + 1
        need_cap = max(p + n for p, n in zip(layout.past_lens, layout.new_lens))
        if need_slots > self.slots or need_cap > self.cap:
            self._grow(
                max(need_slots, self.slots, 2 * self.slots if need_slots > self.slots else 0),
                max(self.cap, 64, 2 * self.cap if need_cap > self.cap else 0, need_cap),
            )

    def _grow(self, slots: int, cap: int) -> None:
        for i in range(self.num_layers):
            for store in (self.k, self.v):
                old = store[i]
                if old is None:
                    continue
                new = torch.zeros(slots, self.n_kv, cap, self.head_dim, dtype=self.dtype, device=self.device)
                new[: old.shape[0], :, : old.shape[2]] = old
                store[i] = new
        self.slots, self.cap = slots, cap

    def _layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is None:
            shape = (self.slots, self.n_kv, self.cap, self.head_dim)
            self.k[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.k[i], self.v[i]

    def decode_index(self, seq_ids, pasts: list[int]):
        """(slots [B], positions [B], mask [B, 1, 1, L]) of a decode step; the same for every
        layer of the step, so built once per step rather than once per layer."""
        key = (tuple(seq_ids), tuple(pasts))
        if self._decode_key != key:
            slots = torch.tensor([self.slot_of[s] for s in seq_ids], device=self.device)
            pos = torch.tensor(pasts, device=self.device)
            mask = torch.arange(max(pasts) + 1, device=self.device)[None, :] <= pos[:, None]  # [B, L]
            self._decode_key, self._decode_index = key, (slots, pos, mask[:, None, None, :])
        return self._decode_index

    def commit(self, layout: BatchLayout) -> None:
        """After a step went through every layer: the new tokens are cached."""
        for seq, p, n in zip(layout.seq_ids, layout.past_lens, layout.new_lens):
            self.lens[seq] = p + n

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self, i)

    def free(self, seq_ids) -> None:
        for s in seq_ids:
            slot = self.slot_of.pop(s, None)
            self.lens.pop(s, None)
            if slot is not None:
                self._free_slots.append(slot)

    def nbytes(self) -> int:
        """Bytes holding cached tokens of live sequences."""
        per_token = 2 * self.num_layers * self.n_kv * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()
        return sum(self.lens.values()) * per_token

    def reserved_bytes(self) -> int:
        """Bytes allocated (slots are reused after a sequence ends, so this only grows)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class LayerKV:
    """What attention_partial sees of the cache: one layer."""

    __slots__ = ("cache", "i")

    def __init__(self, cache: KVCache, i: int) -> None:
        self.cache, self.i = cache, i

    def extend(self, seq_id: int, past: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: [n, n_kv, hd] of one sequence -> all its keys/values [n_kv, past+n, hd] (views)."""
        K, V = self.cache._layer(self.i)
        s, n = self.cache.slot_of[seq_id], k.shape[0]
        K[s, :, past : past + n] = k.transpose(0, 1)
        V[s, :, past : past + n] = v.transpose(0, 1)
        return K[s, :, : past + n], V[s, :, : past + n]

    def extend_decode(self, seq_ids, pasts: list[int], k: torch.Tensor, v: torch.Tensor):
        """One new token for each of B sequences. k, v: [B, n_kv, hd].

        Returns keys/values [B, n_kv, L, hd] (L = the longest length) and a mask [B, 1, 1, L]
        that is True where a slot holds a real token of its sequence.
        """
        K, V = self.cache._layer(self.i)
        slots, pos, mask = self.cache.decode_index(seq_ids, pasts)
        K[slots, :, pos] = k
        V[slots, :, pos] = v
        L = mask.shape[-1]
        return K[slots, :, :L], V[slots, :, :L], mask
