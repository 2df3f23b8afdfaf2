"""What only the master computes: the token embedding before layer 0 and the lm_head after the
final norm (with tied embeddings both are the same matrix, held once)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tpi_node.model.config import ModelConfig
from tpi_node.weights.checkpoint import CheckpointReader
from tpi_node.weights.slicer import EMBED, LM_HEAD


class ModelHead:
    def __init__(self, model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        reader = CheckpointReader(model_dir)
        self.embed_w = reader.get(EMBED).to(device, dtype)                       # [V, H]
        if cfg.tie_embeddings or not reader.has(LM_HEAD):
            self.lm_head_w = self.embed_w
        else:
            self.lm_head_w = reader.get(LM_HEAD).to(device, dtype)               # [V, H]
        reader.close()
        self.vocab_size = self.embed_w.shape[0]

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """[T] token ids -> [T, H]."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.embed_w.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
        return self.embed_w[ids]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, H] final-normed hidden -> [B, V] float32 logits."""
        return F.linear(h.to(self.lm_head_w.device, self.lm_head_w.dtype), self.lm_head_w).float()

    def nbytes(self) -> int:
        n = self.embed_w.numel() * self.embed_w.element_size()
        return n if self.lm_head_w is self.embed_w else 2 * n
