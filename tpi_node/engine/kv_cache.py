"""KV cache of the heads a node holds: per sequence, per layer, grown by doubling."""
from __future__ import annotations

import torch


class SequenceKV:
    """Keys and values of one sequence: per layer a buffer [n_kv, capacity, hd]."""

    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lens = [0] * num_layers

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class KVCache:
    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype, device="cpu") -> None:
        self.num_layers, self.n_kv, self.head_dim = num_layers, n_kv, head_dim
        self.dtype, self.device = dtype, device
        self.seqs: dict[int, SequenceKV] = {}

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self, i)

    def length(self, seq_id: int) -> int:
        s = self.seqs.get(seq_id)
        return s.lens[-1] if s else 0

    def append(self, i: int, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [n, n_kv, hd] new entries -> all entries of layer i, [n_kv, len, hd] each."""
        s = self.seqs.get(seq_id)
        if s is None:
            s = self.seqs[seq_id] = SequenceKV(self.num_layers)
        n, old = k.shape[0], s.lens[i]
        buf_k, buf_v = s.k[i], s.v[i]
        if buf_k is None or old + n > buf_k.shape[1]:
            cap = max(64, 2 * (old + n))
            new_k = torch.empty(self.n_kv, cap, self.head_dim, dtype=self.dtype, device=self.device)
            new_v = torch.empty_like(new_k)
            if old:
                new_k[:, :old], new_v[:, :old] = buf_k[:, :old], buf_v[:, :old]
            s.k[i], s.v[i] = buf_k, buf_v = new_k, new_v
        buf_k[:, old:old + n] = k.transpose(0, 1)
        buf_v[:, old:old + n] = v.transpose(0, 1)
        s.lens[i] = old + n
        return buf_k[:, :old + n], buf_v[:, :old + n]

    def free(self, seq_ids) -> None:
        for s in seq_ids:
            self.seqs.pop(s, None)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.seqs.values())


class LayerKV:
    """The view attention_partial uses: `append(seq_id, k, v)` for one layer."""

    __slots__ = ("cache", "i")

    def __init__(self, cache: KVCache, i: int) -> None:
        self.cache, self.i = cache, i

    def append(self, seq_id: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.append(self.i, seq_id, k, v)
