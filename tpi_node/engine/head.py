"""What only the master computes: the token embedding before layer 0 and the lm_head after the
final norm (with tied embeddings both are the same matrix, held once)."""

from __future__ import annotations

from pathlib import Path

import torch

from tpi_node.model.config import ModelConfig
from tpi_node.model.layers import can_prepack, linear, prepack
from tpi_node.model.qkernel import dequantize
from tpi_node.model.quant import QMatrix, quantizable, quantize
from tpi_node.weights.checkpoint import open_checkpoint
from tpi_node.weights.slicer import EMBED, LM_HEAD


def _load_rows(reader, name: str, dtype: torch.dtype, device, quant: str, block: int = 4096) -> torch.Tensor | QMatrix:
    """A [V, H] matrix filled block by block: converting dtype never holds two whole copies.
    Stored in blocks (a GGUF's Q8_0 / Q4_x), it stays so; a float one is quantised to q8_0 under
    --quant int8 / int4 (llama.cpp's Q4 files keep their output layer at 8 bits, too)."""
    rows, cols = reader.shape(name)
    first = reader.rows(name, 0, min(block, rows))
    if isinstance(first, QMatrix) or (quant != "none" and quantizable(first)):
        parts = [first] + [reader.rows(name, a, min(a + block, rows)) for a in range(block, rows, block)]
        parts = [p if isinstance(p, QMatrix) else quantize(p, "q8_0") for p in parts]
        return QMatrix(torch.cat([p.data for p in parts])).to(device)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    out[:block] = first
    for a in range(block, rows, block):
        out[a : a + block] = reader.rows(name, a, min(a + block, rows))
    return out


class ModelHead:
    """The lm_head stays in memory (every row is read for every token; on the CPU a float one is
    prepacked for oneDNN, see model/layers.linear; a quantised one runs the quantised matmul).
    The embedding is only looked up: from the lm_head when they are tied (quantised rows are
    dequantised as they are looked up), else from the memory-mapped checkpoint."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        prepacked: bool = True,
        quant: str = "none",
    ) -> None:
        reader = open_checkpoint(model_dir)
        self.dtype, self.device = dtype, torch.device(device)
        tied = cfg.tie_embeddings or not reader.has(LM_HEAD)
        self.lm_head_w = _load_rows(reader, EMBED if tied else LM_HEAD, dtype, device, quant)  # [V, H]
        self.vocab_size = self.lm_head_w.shape[0]
        if prepacked and isinstance(self.lm_head_w, torch.Tensor) and can_prepack(self.device, dtype):
            # faster logits; the reorder holds two copies for a moment, so a node that runs
            # under a memory budget (prepacked=False) keeps the plain matrix
            self.lm_head_w = prepack(self.lm_head_w)
        if tied and (isinstance(self.lm_head_w, QMatrix) or not self.lm_head_w.is_mkldnn):
            self._reader = None  # the embedding is the lm_head itself
            reader.close()  # unmap the checkpoint: its pages would count in this process's RSS
        else:
            # the embedding's rows are read on demand; a fresh reader maps no page the lm_head's
            # load touched (they would stay in this process's RSS)
            reader.close()
            self._reader = open_checkpoint(model_dir)

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """[T] token ids -> [T, H]."""
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}")
        if self._reader is None:
            if isinstance(self.lm_head_w, QMatrix):
                rows = [dequantize(self.lm_head_w, self.dtype, t, t + 1) for t in token_ids]
                return torch.cat(rows).to(self.device) if rows else torch.empty(0, self.lm_head_w.shape[1])
            return self.lm_head_w[torch.tensor(token_ids, dtype=torch.long, device=self.device)]
        rows = [self._reader.rows(EMBED, t, t + 1) for t in token_ids]
        rows = [r.dequantize(self.dtype) if isinstance(r, QMatrix) else r for r in rows]
        return torch.cat(rows).to(self.device, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, H] final-normed hidden -> [B, V] float32 logits."""
        return linear(h.to(self.device, self.dtype), self.lm_head_w).float()

    def nbytes(self) -> int:
        """Bytes held in memory (the memory-mapped embedding is not held)."""
        if isinstance(self.lm_head_w, QMatrix):
            return self.lm_head_w.nbytes()
        return self.lm_head_w.numel() * self.lm_head_w.element_size()
