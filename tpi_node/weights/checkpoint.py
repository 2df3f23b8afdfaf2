"""Lazy readers of a model's weights: a Hugging Face checkpoint (one safetensors file or a sharded
index) or a GGUF file (`model.gguf` in a prepared directory, see weights/prepare.py).

Nothing is read until asked for, and a slice reads only its own rows: the master never holds the
whole model in RAM, it cuts each node's slices straight out of the memory-mapped files. Both
readers answer in Hugging Face tensor names and layouts; a matrix comes back as a float tensor,
or as a QMatrix (model/quant.py) when it is stored in quantised blocks: a GGUF's Q4_0 / Q4_1 /
Q8_0 tensors, its Q4_K / Q6_K tensors repacked into 32-weight blocks (weights/repack.py), or a
safetensors U8 tensor [N, K/32, block bytes] as `synth --quant` writes.

    reader = open_checkpoint(model_dir)
    reader.rows("model.layers.0.self_attn.q_proj.weight", 0, 128)   # Tensor or QMatrix
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from tpi_node.dtypes import SAFETENSORS
from tpi_node.errors import UserError
from tpi_node.model.quant import BLOCK, BLOCK_BYTES, FORMAT_OF_BYTES, QMatrix
from tpi_node.weights.gguf import GGML_TYPES, GGUF_NAME, GgufFile
from tpi_node.weights.repack import REPACK, repack

Weight = torch.Tensor | QMatrix


class CheckpointReader:
    """Safetensors weights in HF names (float tensors, or U8 block tensors -> QMatrix)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise UserError(f"no safetensors weights in {self.dir}")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self._headers: dict[str, tuple[dict, int]] = {}  # file -> (safetensors header, data offset)
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise UserError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        return self.weight_map[name]

    def _slice(self, name: str):
        fname = self._file_of(name)
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.dir / fname, "pt")
        return self._handles[fname].get_slice(name)

    @staticmethod
    def _blocks(sl) -> bool:
        shape = sl.get_shape()
        return sl.get_dtype() == "U8" and len(shape) == 3 and shape[-1] in FORMAT_OF_BYTES

    def get(self, name: str) -> Weight:
        sl = self._slice(name)
        return QMatrix(sl[:]) if self._blocks(sl) else sl[:]

    def block_format(self, name: str) -> str | None:
        """'q4_1' etc. for a tensor stored in quantised blocks, None for a float one."""
        sl = self._slice(name)
        return FORMAT_OF_BYTES[sl.get_shape()[-1]] if self._blocks(sl) else None

    def shape(self, name: str) -> list[int]:
        sl = self._slice(name)
        shape = list(sl.get_shape())
        return [shape[0], shape[1] * BLOCK] if self._blocks(sl) else shape

    def rows(self, name: str, start: int, end: int) -> Weight:
        """Rows [start, end) of a matrix (or elements of a vector), reading only those bytes."""
        sl = self._slice(name)
        return QMatrix(sl[start:end]) if self._blocks(sl) else sl[start:end]

    def cols(self, name: str, start: int, end: int) -> Weight:
        sl = self._slice(name)
        if self._blocks(sl):
            return QMatrix(sl[:]).cols(start, end).contiguous()
        return sl[:, start:end]

    def _header(self, name: str) -> tuple[str, dict, int]:
        """(file, the tensor's header entry, where the file's data starts)."""
        fname = self._file_of(name)
        if fname not in self._headers:
            with open(self.dir / fname, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[fname] = (json.loads(f.read(n)), 8 + n)
        header, base = self._headers[fname]
        return fname, header[name], base

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, byte offset of the tensor's data, bytes per row): rows in HF order read straight
        from the file (mapped() says when a reader stores them otherwise)."""
        fname, meta, base = self._header(name)
        a, b = meta["data_offsets"]
        return self.dir / fname, base + a, (b - a) // meta["shape"][0]

    def mapped(self, name: str) -> tuple[torch.Tensor, None]:
        """(the tensor as a view of the mapped file, None): nothing copied; float [N, K] or [N],
        or U8 blocks [N, K/32, block bytes]. None: its rows are stored in HF order (see GgufReader)."""
        fname, meta, base = self._header(name)
        if fname not in self._maps:  # copy-on-write: writable for torch, never written
            self._maps[fname] = np.memmap(self.dir / fname, dtype=np.uint8, mode="c")
        a, b = meta["data_offsets"]
        raw = torch.from_numpy(self._maps[fname][base + a : base + b])
        return raw.view(SAFETENSORS[meta["dtype"]]).view(meta["shape"]), None

    def release_pages(self) -> None:
        """Let go of the files' mappings (reopened on the next read): the pages read so far leave
        this process's RSS, so a node streaming its layers from here holds only its window."""
        self._handles.clear()
        self._maps.clear()

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()


# HF tensor name <-> GGUF tensor name (llama.cpp's names for the Llama / Mistral / Qwen2 family);
# {i} is a layer number, {p} is weight or bias.
_NAME_PAIRS = (
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "blk.{i}.attn_q.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "blk.{i}.attn_k.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "blk.{i}.attn_v.{p}"),
    ("model.layers.{i}.self_attn.o_proj.{p}", "blk.{i}.attn_output.{p}"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
)


@functools.cache
def _regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", "(?P<p>weight|bias)"))


def _translate(name: str, src: int) -> str | None:
    for pair in _NAME_PAIRS:
        m = _regex(pair[src]).fullmatch(name)
        if m:
            return pair[1 - src].format(**m.groupdict())
    return None


def gguf_name(hf_name: str) -> str | None:
    return _translate(hf_name, 0)


def hf_name(gguf: str) -> str | None:
    return _translate(gguf, 1)


_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_GGML_NAMES = {name for name, _, _ in GGML_TYPES.values()}
# GGUF block type -> the block format it is served in: as stored, or repacked (weights/repack.py)
SERVED_AS = {t.upper(): t for t in BLOCK_BYTES if t.upper() in _GGML_NAMES} | {t: f for t, (_, f) in REPACK.items()}
NATIVE_TYPES = (*_FLOATS, *SERVED_AS)  # the GGUF types served


def refuse_unserved_types(g: GgufFile) -> None:
    """UserError when a tensor the model reads is stored in a type tpi-node does not serve (Q5_K,
    Q3_K, the IQ types, ...), naming the types and how to convert."""
    unserved = Counter(t.type for t in g.tensors.values() if hf_name(t.name) is not None and t.type not in NATIVE_TYPES)
    if unserved:
        found = ", ".join(f"{kind}: {n}" for kind, n in unserved.most_common())
        raise UserError(
            f"{g.path} stores tensors in types tpi-node does not serve yet ({found} tensors; served as they "
            f"are: {', '.join(NATIVE_TYPES)}). Re-quantise the file with llama.cpp "
            f"(`llama-quantize --allow-requantize {g.path.name} out.gguf Q8_0`, or Q4_0), "
            "or serve the model's Hugging Face checkpoint with --quant int8 or int4"
        )


class GgufReader:
    """A GGUF's tensors in HF names and layouts, its quantised blocks kept as they are (K-quants'
    super-blocks repacked into 32-weight blocks, exactly: weights/repack.py).

    llama.cpp stores a Llama's q_proj / k_proj rows permuted for its rope kernel; reading undoes
    that with a row index (transformers does the same when it loads a GGUF), which moves whole
    rows of blocks and so works on the quantised bytes unchanged.
    """

    def __init__(self, path: str | Path, cfg: dict) -> None:
        self.file = GgufFile(path, arrays=False)  # the tensors only: the tokenizer comes from prepare's files
        refuse_unserved_types(self.file)
        self.path = Path(path)
        self.permute_heads: dict[str, int] = {}
        if cfg.get("model_type", "llama") in ("llama", "mistral"):
            self.permute_heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg.get("num_key_value_heads") or 0}
            self.permute_heads["k_proj"] = self.permute_heads["k_proj"] or cfg["num_attention_heads"]
        self._hf = {hf_name(g): g for g in self.file.names() if hf_name(g) is not None}

    def names(self) -> list[str]:
        return list(self._hf)

    def has(self, name: str) -> bool:
        return name in self._hf

    def _info(self, name: str):
        if name not in self._hf:
            raise UserError(f"{self.path}: tensor '{name}' ({gguf_name(name)}) is missing from the GGUF")
        return self.file.tensors[self._hf[name]]

    def shape(self, name: str) -> list[int]:
        return list(self._info(name).shape)

    def block_format(self, name: str) -> str | None:
        return SERVED_AS.get(self._info(name).type)

    def _row_index(self, name: str, start: int, end: int) -> np.ndarray | slice:
        heads = next((h for key, h in self.permute_heads.items() if f".{key}." in name), None)
        if heads is None:
            return slice(start, end)
        rows = self._info(name).shape[0]
        # HF row r is GGUF row idx[r]: per head, GGUF interleaves the two rope halves
        idx = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)
        return idx[start:end]

    def _read(self, name: str, rows) -> Weight:
        t = self._info(name)
        raw = self.file.raw(t.name)
        if t.type in _FLOATS:
            dt = _FLOATS[t.type]
            if len(t.shape) == 1:  # a vector (norm, bias): whole, then the rows asked for
                return torch.from_numpy(np.array(raw)).view(dt)[rows]
            per_row = raw.reshape(t.shape[0], -1)
            return torch.from_numpy(np.array(per_row[rows])).view(dt).reshape(-1, t.shape[1])
        if t.type in REPACK:  # K-quants: their rows' super-blocks as 32-weight blocks
            return QMatrix(torch.from_numpy(repack(t.type, raw.reshape(t.shape[0], -1)[rows])))
        fmt = t.type.lower()
        blocks = raw.reshape(t.shape[0], t.shape[1] // BLOCK, BLOCK_BYTES[fmt])
        return QMatrix(torch.from_numpy(np.array(blocks[rows])))

    def get(self, name: str) -> Weight:
        t = self._info(name)
        return self._read(name, self._row_index(name, 0, t.shape[0]))

    def rows(self, name: str, start: int, end: int) -> Weight:
        return self._read(name, self._row_index(name, start, end))

    def cols(self, name: str, start: int, end: int) -> Weight:
        w = self.get(name)
        return w.cols(start, end).contiguous() if isinstance(w, QMatrix) else w[:, start:end].contiguous()

    def mapped(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the tensor as a view of the mapped file, the stored row of each HF row or None when
        they are the same): nothing copied; float [N, K] or [N], or U8 blocks [N, K/32, bytes]
        (a K-quant's: repacked, a copy)."""
        t = self._info(name)
        index = self._row_index(name, 0, t.shape[0])
        index = None if isinstance(index, slice) else torch.from_numpy(index)
        if t.type in REPACK:
            return torch.from_numpy(repack(t.type, self.file.raw(t.name).reshape(t.shape[0], -1))), index
        with warnings.catch_warnings():  # a read-only mapping: the views are never written
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self.file.raw(t.name))
        if t.type in _FLOATS:
            view = raw.view(_FLOATS[t.type]).view(t.shape)
        else:
            fmt = t.type.lower()
            view = raw.view(t.shape[0], t.shape[1] // BLOCK, BLOCK_BYTES[fmt])
        return view, index

    def location(self, name: str) -> tuple[Path, int, int] | None:
        """As CheckpointReader.location (rows as stored: mapped() gives the order); None for a
        K-quant, whose stored bytes are not the blocks it is served in."""
        t = self._info(name)
        return None if t.type in REPACK else (self.path, t.offset, t.nbytes // t.shape[0])

    def release_pages(self) -> None:
        """As CheckpointReader.release_pages (the file is mapped afresh; its header stays parsed)."""
        self.file.remap()

    def close(self) -> None:
        self.file.close()


def open_checkpoint(model_dir: str | Path) -> CheckpointReader | GgufReader:
    """The reader for a model directory: its model.gguf when it has one, else its safetensors."""
    d = Path(model_dir)
    link = d / GGUF_NAME
    if link.is_symlink() and not link.exists():
        raise UserError(
            f"{link} links to {os.readlink(link)}, which is not there (in a container, mount that file too, "
            "or prepare the model where it runs)"
        )
    if link.exists():
        return GgufReader(d / GGUF_NAME, json.loads((d / "config.json").read_text()))
    return CheckpointReader(d)


def model_digest(model_dir: str | Path) -> str:
    """Names a model's weights for caches: config.json plus each weight file's name, size, mtime."""
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted([*d.glob("*.safetensors"), *d.glob(GGUF_NAME)]):
        st = f.stat()  # follows the symlink of a prepared GGUF to the file itself
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
