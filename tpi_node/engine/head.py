"""What only the master computes: the token embedding before layer 0 and the lm_head after the
final norm (with tied embeddings both are the same matrix, held once)."""

from __future__ import annotations

from pathlib import Path

import torch

from tpi_node.model.config import ModelConfig
from tpi_node.model.layers import can_prepack, linear, prepack
from tpi_node.weights.checkpoint import CheckpointReader
from tpi_node.weights.slicer import EMBED, LM_HEAD


def _load_rows(
    reader: CheckpointReader, name: str, cfg: ModelConfig, dtype: torch.dtype, device, block: int = 4096
) -> torch.Tensor:
    """A [V, H] matrix filled block by block: converting dtype never holds two whole copies."""
    rows, cols = reader.shape(name)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    for a in range(0, rows, block):
        out[a : a + block] = reader.rows(name, a, min(a + block, rows))
    return out


class ModelHead:
    """The lm_head stays in memory (every row is read for every token; on the CPU it is prepacked
    for oneDNN, see model/layers.linear). The embedding is only looked up: when it is a separate
    matrix, or when the tied one was prepacked, its rows come from the memory-mapped checkpoint."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        prepacked: bool = True,
    ) -> None:
        reader = CheckpointReader(model_dir)
        self.dtype, self.device = dtype, torch.device(device)
        tied = cfg.tie_embeddings or not reader.has(LM_HEAD)
        self.lm_head_w = _load_rows(reader, EMBED if tied else LM_HEAD, cfg, dtype, device)  # [V, H]
        self.vocab_size = self.lm_head_w.shape[0]
        if prepacked and can_prepack(self.device, dtype):
            # faster logits; the reorder holds two copies for a moment, so a node that runs
            # under a memory budget (prepacked=False) keeps the plain matrix
            self.lm_head_w = prepack(self.lm_head_w)
        if tied and not self.lm_head_w.is_mkldnn:
            self._reader = None  # the embedding is the lm_head itself
            reader.close()  # unmap the checkpoint: its pages would count in this process's RSS
        else:
            self._reader = reader

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """[T] token ids -> [T, H]."""
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
        if self._reader is None:
            return self.lm_head_w[torch.tensor(token_ids, dtype=torch.long, device=self.device)]
        rows = [self._reader.rows(EMBED, t, t + 1) for t in token_ids]
        return torch.cat(rows).to(self.device, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, H] final-normed hidden -> [B, V] float32 logits."""
        return linear(h.to(self.device, self.dtype), self.lm_head_w).float()

    def nbytes(self) -> int:
        """Bytes held in memory (the memory-mapped embedding is not held)."""
        return self.lm_head_w.numel() * self.lm_head_w.element_size()
