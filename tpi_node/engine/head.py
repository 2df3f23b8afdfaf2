"""What only the master computes: the token embedding before layer 0 and the lm_head after the
final norm (with tied embeddings both are the same matrix, held once)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tpi_node.model.config import ModelConfig
from tpi_node.weights.checkpoint import CheckpointReader
from tpi_node.weights.slicer import EMBED, LM_HEAD


def _load_rows(reader: CheckpointReader, name: str, cfg: ModelConfig, dtype: torch.dtype, device,
               block: int = 4096) -> torch.Tensor:
    """A [V, H] matrix filled block by block: converting dtype never holds two whole copies."""
    rows, cols = reader.shape(name)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    for a in range(0, rows, block):
        out[a:a + block] = reader.rows(name, a, min(a + block, rows))
    return out


class ModelHead:
    def __init__(self, model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        reader = CheckpointReader(model_dir)
        self.dtype, self.device = dtype, torch.device(device)
        if cfg.tie_embeddings or not reader.has(LM_HEAD):
            self.lm_head_w = _load_rows(reader, EMBED, cfg, dtype, device)       # [V, H], also the embedding
            self._reader = None
            reader.close()          # unmap the checkpoint: its pages would count in this process's RSS
        else:
            # untied: the lm_head must be in memory (every row, every token), but the embedding
            # is only looked up - those rows are read from the memory-mapped checkpoint on demand
            self.lm_head_w = _load_rows(reader, LM_HEAD, cfg, dtype, device)     # [V, H]
            self._reader = reader
        self.vocab_size = self.lm_head_w.shape[0]

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
        return F.linear(h.to(self.lm_head_w.device, self.lm_head_w.dtype), self.lm_head_w).float()

    def nbytes(self) -> int:
        """Bytes held in memory (the memory-mapped embedding of an untied model is not held)."""
        return self.lm_head_w.numel() * self.lm_head_w.element_size()
