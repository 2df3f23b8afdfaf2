"""The lm_head's rows as one node of a split head holds them (--head-split,
NodeShare.vocab_rows): read from the checkpoint (`load_rows`), written into a worker's slice set as
head.safetensors (weights/slicer.py write_head: one tensor "lm_head", float rows or a quantised
matrix's blocks) and read back (`read_head`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from tpi_node.errors import UserError
from tpi_node.heap import huge_empty
from tpi_node.model.config import ModelConfig
from tpi_node.model.quant import QMatrix, quantizable, quantize

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
HEAD_FILE = "head.safetensors"


def load_rows(
    reader, name: str, dtype: torch.dtype, device, quant: str, start: int = 0, end: int | None = None, block: int = 4096
) -> torch.Tensor | QMatrix:
    """Rows [start, end) of a [V, H] matrix, filled block by block: converting dtype never holds
    two whole copies. Stored in blocks (a GGUF's Q8_0 / Q4_x), it stays so; a float one is
    quantised to q8_0 under --quant int8 / int4 (llama.cpp's Q4 files keep their output layer at
    8 bits, too)."""
    total = reader.shape(name)[0]
    end = total if end is None else end
    first = reader.rows(name, start, min(start + block, end))
    blocks = isinstance(first, QMatrix) or (quant != "none" and quantizable(first))

    def part_of(rows) -> torch.Tensor:  # stored in blocks (a GGUF's Q8_0 / Q4_x) it stays so
        return (rows if isinstance(rows, QMatrix) else quantize(rows, "q8_0")).data if blocks else rows

    def fill(out: torch.Tensor, a: int, part: torch.Tensor) -> None:
        out[a - start : a - start + part.shape[0]] = part
        # the file's pages this block read leave the RSS now, not when the reader closes (the
        # head is read whole: SmolLM2's Q8_0 head would count three times at the peak)
        reader.release_pages()

    first = part_of(first)
    shape, out_dtype = (end - start, *first.shape[1:]), torch.uint8 if blocks else dtype
    if torch.device(device).type == "cpu":  # read in full every token: huge pages (heap.huge_empty)
        out = huge_empty(math.prod(shape) * out_dtype.itemsize).view(out_dtype).view(shape)
    else:
        out = torch.empty(shape, dtype=out_dtype, device=device)
    fill(out, start, first)
    for a in range(start + block, end, block):
        fill(out, a, part_of(reader.rows(name, a, min(a + block, end))))
    return QMatrix(out).to(device) if blocks else out


def head_name(reader, cfg: ModelConfig) -> str:
    """The checkpoint tensor the lm_head's rows are: the embedding when they are tied."""
    return EMBED if cfg.tie_embeddings or not reader.has(LM_HEAD) else LM_HEAD


def read_head(path: Path, rows: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor | QMatrix:
    """A HEAD_FILE's rows (UserError when it does not hold rows [a, b))."""
    with safe_open(str(path), "pt") as f:
        t = f.get_tensor("lm_head")
    if t.shape[0] != rows[1] - rows[0]:
        want = rows[1] - rows[0]
        raise UserError(f"{path} holds {t.shape[0]} lm_head rows, not the {want} of rows {rows[0]}-{rows[1]}")
    return QMatrix(t).to(device) if t.dtype == torch.uint8 else t.to(device, dtype)
