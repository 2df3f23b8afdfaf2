"""The token embedding before layer 0 and the lm_head after the final norm (with tied embeddings
both are the same matrix, held once). `ModelHead` is the master's: the embedding, and the whole
lm_head unless the head is split by vocabulary (--head-split), where every node holds a
`VocabShard` of its rows (engine/vocab.py runs it)."""

from __future__ import annotations

from pathlib import Path

import torch

from tpi_node.engine.device import cpu_cores
from tpi_node.model.config import ModelConfig
from tpi_node.model.layers import can_prepack, linear, prepack, prepack_pays
from tpi_node.model.qkernel import TUNING, dequantize
from tpi_node.model.quant import QMatrix
from tpi_node.weights.checkpoint import open_checkpoint
from tpi_node.weights.head_rows import EMBED, head_name, load_rows, read_head


def _held_bytes(w: torch.Tensor | QMatrix) -> int:
    return w.nbytes() if isinstance(w, QMatrix) else w.numel() * w.element_size()


class VocabShard:
    """Rows [start, end) of the lm_head, held in memory on one node of a split head."""

    def __init__(
        self, w: torch.Tensor | QMatrix, start: int, dtype: torch.dtype, device, prepacked: bool = True
    ) -> None:
        self.start, self.end = start, start + w.shape[0]
        self.dtype, self.device = dtype, torch.device(device)
        if prepacked and isinstance(w, torch.Tensor) and can_prepack(self.device, dtype) and prepack_pays(w):
            w = prepack(w)  # as ModelHead's: the same kernel gives the same logits
        self.w = w

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        cfg: ModelConfig,
        rows: tuple[int, int],
        dtype: torch.dtype,
        device,
        quant: str,
        prepacked: bool = True,
    ) -> VocabShard:
        reader = open_checkpoint(model_dir)
        try:
            w = load_rows(reader, head_name(reader, cfg), dtype, device, quant, *rows)
        finally:
            reader.close()
        return cls(w, rows[0], dtype, device, prepacked)

    @classmethod
    def from_file(
        cls, path: Path, rows: tuple[int, int], dtype: torch.dtype, device, prepacked: bool = True
    ) -> VocabShard:
        """A worker's rows, from head.safetensors in its slice set (weights/head_rows.py)."""
        return cls(read_head(path, rows, dtype, device), rows[0], dtype, device, prepacked)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[R, H] final-normed hidden -> [R, end - start] float32 logits of this node's rows."""
        return linear(h.to(self.device, self.dtype), self.w).float()

    def nbytes(self) -> int:
        return _held_bytes(self.w)


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
        lm_head: bool = True,
    ) -> None:
        """lm_head=False: the head is split by vocabulary (the nodes' VocabShards hold it); only
        the embedding is looked up here, from the memory-mapped checkpoint."""
        reader = open_checkpoint(model_dir)
        self.dtype, self.device = dtype, torch.device(device)
        self.threads = cpu_cores()  # for a quantised head's kernel (see `logits`)
        tied = head_name(reader, cfg) == EMBED
        if not lm_head:
            self.lm_head_w, self.vocab_size = None, reader.shape(head_name(reader, cfg))[0]
            reader.close()
            self._reader = open_checkpoint(model_dir)
            return
        self.lm_head_w = load_rows(reader, head_name(reader, cfg), dtype, device, quant)  # [V, H]
        self.vocab_size = self.lm_head_w.shape[0]
        if (
            prepacked
            and isinstance(self.lm_head_w, torch.Tensor)
            and can_prepack(self.device, dtype)
            and prepack_pays(self.lm_head_w)
        ):
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

    @property
    def split(self) -> bool:
        """The lm_head is split by vocabulary across the nodes (not held here)."""
        return self.lm_head_w is None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B, H] final-normed hidden -> [B, V] float32 logits. Where the layers' quantised matmuls
        run on one thread (a local cluster's share of the cores, or `tune` found no clear win), a
        quantised head's kernel runs on every core this process may use: the other nodes wait for
        the next step meanwhile (SmolLM2's Q8_0 head, 2 local nodes on 2 cores: 4.8 -> 2.5 ms a
        token). Else it keeps the layers' count: every job of the kernel's pool waits for all of
        its workers, so a wider head would make the layers' jobs wait for idle ones."""
        threads = self.threads if TUNING.decode_threads == 1 else None
        return linear(h.to(self.device, self.dtype), self.lm_head_w, threads=threads).float()

    def nbytes(self) -> int:
        """Bytes held in memory (the memory-mapped embedding is not held)."""
        return 0 if self.lm_head_w is None else _held_bytes(self.lm_head_w)
