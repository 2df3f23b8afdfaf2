"""Cutting one node's slices out of a checkpoint, and out of the slices it already has.

Weight loading is data: `LAYER_NAMES` maps our roles to Hugging Face tensor names, and
`slice_layer` cuts rows or columns by the node's KV-head range and FFN range. Each node keeps its
slices as one safetensors file per layer plus `norms.safetensors` (every RMSNorm weight; tiny,
always resident) in a slice set named by the model, the dtype, --quant and the ranges it holds
(weights/cache.py: bounded by --cache-size, listed and pruned by `tpi-node cache`).

A layer file is addressable by unit: `layouts` says, per tensor, along which axis its rows or
columns run unit by unit (wqkv: the q rows of each KV-head group, then their k rows, then their v
rows). `read_part` cuts any sub-range of units out of a layer file, reading only those bytes, and
`join_parts` glues adjacent parts back into the file a larger range has, byte for byte. So a node
whose share grows (a node lost, its units handed to the survivors) keeps what it held and fetches
only the units it gains (FetchShard with a unit range; cluster/worker.py).

Quantised matrices (a GGUF's blocks, or float weights under --quant int8 / int4) are written as
their blocks: a U8 tensor [N, K/32, block bytes] (model/quant.py), so every shard on disk, every
FetchShard stream and every window slot holds the quantised bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tpi_node.dtypes import SAFETENSORS, dtype_bytes, torch_dtype
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.model.quant import BLOCK, QMatrix, cat_rows, quantizable, quantize_for
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.weights import cache
from tpi_node.weights.cache import Span
from tpi_node.weights.checkpoint import CheckpointReader, GgufReader, Weight, open_checkpoint
from tpi_node.weights.head_rows import HEAD_FILE, head_name, load_rows
from tpi_node.weights.plan import NodeShare, PartitionPlan

LAYER_NAMES = {
    "q": "model.layers.{i}.self_attn.q_proj",
    "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj",
    "o": "model.layers.{i}.self_attn.o_proj",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "input_norm": "model.layers.{i}.input_layernorm.weight",
    "post_norm": "model.layers.{i}.post_attention_layernorm.weight",
}
FINAL_NORM = "model.norm.weight"


@dataclass(frozen=True)
class ShardFile:
    """One file of a node's shard cache: what the master's manifest says and a worker checks."""

    name: str  # "layer-000.safetensors", "norms.safetensors"
    size: int
    sha256: str  # hex digest of the whole file

    def to_pb(self) -> pb.ShardFile:
        return pb.ShardFile(name=self.name, size=self.size, sha256=self.sha256)

    @classmethod
    def from_pb(cls, msg: pb.ShardFile) -> ShardFile:
        return cls(msg.name, int(msg.size), msg.sha256)


# One piece of a node's tensor: rows or columns [start, end) of a checkpoint tensor (HF name).
Part = tuple[str, str, int, int]  # (name, "rows" | "cols", start, end)


def layer_parts(cfg: ModelConfig, share: NodeShare, i: int) -> dict[str, list[Part]]:
    """The slicing table: each of a node's tensors of layer i as the pieces it is made of, stacked
    row-wise in this order (see model/layers.py LayerWeights for the shapes)."""
    n = {k: v.format(i=i) for k, v in LAYER_NAMES.items()}
    hd, g = cfg.head_dim, cfg.q_per_kv
    out: dict[str, list[Part]] = {}
    if share.n_kv:
        q0, q1 = share.kv_start * g * hd, share.kv_end * g * hd  # query rows of our heads
        k0, k1 = share.kv_start * hd, share.kv_end * hd
        out["wqkv"] = [(n[r] + ".weight", "rows", a, b) for r, a, b in (("q", q0, q1), ("k", k0, k1), ("v", k0, k1))]
        if cfg.attention_bias:
            out["bqkv"] = [(n[r] + ".bias", "rows", a, b) for r, a, b in (("q", q0, q1), ("k", k0, k1), ("v", k0, k1))]
        out["wo"] = [(n["o"] + ".weight", "cols", q0, q1)]
    if share.n_ffn:
        f0, f1 = share.ffn_start, share.ffn_end
        out["w13"] = [(n["gate"] + ".weight", "rows", f0, f1), (n["up"] + ".weight", "rows", f0, f1)]
        out["w2"] = [(n["down"] + ".weight", "cols", f0, f1)]
    return out


def slice_layer(reader: CheckpointReader | GgufReader, cfg: ModelConfig, share: NodeShare, i: int) -> dict[str, Weight]:
    """One node's tensors of layer i, cut out of the checkpoint by the slicing table."""
    out = {}
    for key, parts in layer_parts(cfg, share, i).items():
        got = [reader.rows(n, a, b) if how == "rows" else reader.cols(n, a, b) for n, how, a, b in parts]
        out[key] = got[0] if len(got) == 1 else cat_rows(got)
    return out


def read_norms(reader: CheckpointReader | GgufReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """All RMSNorm weights: input.{i}, post.{i}, final."""
    out = {"final": reader.get(FINAL_NORM)}
    for i in range(cfg.num_layers):
        out[f"input.{i}"] = reader.get(LAYER_NAMES["input_norm"].format(i=i))
        out[f"post.{i}"] = reader.get(LAYER_NAMES["post_norm"].format(i=i))
    return out


def spans(share: NodeShare) -> tuple[Span, Span]:
    return (share.kv_start, share.kv_end), (share.ffn_start, share.ffn_end)


def shard_dir(model_digest: str, plan: PartitionPlan, rank: int, dtype: str, quant: str = "none") -> Path:
    """Rank's slice set: named by what it holds (weights/cache.py), so every plan that gives a
    node these ranges finds it, and another dtype or --quant is another folder."""
    return cache.set_dir(model_digest, dtype, quant, *spans(plan.share_of(rank)))


def set_bytes(cfg: ModelConfig, share: NodeShare, dtype: str, per_param: float | None = None) -> int:
    """About what a share's set takes on disk (`per_param`: bytes per weight as stored)."""
    per_param = per_param or dtype_bytes(dtype)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * dtype_bytes(dtype)
    return int(cfg.num_layers * share.layer_params(cfg) * per_param) + norms


MATRICES = ("wqkv", "wo", "w13", "w2")  # the rest of a layer file (biases) stays in --dtype


def stored_layer(tensors: dict[str, Weight], dtype: torch.dtype, quant: str) -> dict[str, torch.Tensor]:
    """A layer's slices as written to its file: float matrices quantised by --quant (a width that
    is not a multiple of 32 stays float), quantised ones as their blocks, the rest in dtype."""
    out = {}
    for k, v in tensors.items():
        if k in MATRICES and not isinstance(v, QMatrix) and quantizable(v):
            v = quantize_for(v, quant)
        out[k] = v.data if isinstance(v, QMatrix) else v.to(dtype)
    return out


# ---- a layer file by unit ----------------------------------------------------------------------
class PartError(ValueError):
    """A part cannot be cut or joined exactly (a quantised block would straddle a unit edge, or
    the pieces differ in format): fetch the whole file instead."""


@dataclass(frozen=True)
class Layout:
    """How a tensor of a layer file runs unit by unit: segments along `axis` (wqkv: q, k, v),
    each holding `per` rows or columns of every unit, units in order."""

    unit: str  # "kv": KV-head groups; "ffn": FFN columns
    axis: int
    per: tuple[int, ...]


def layouts(cfg: ModelConfig) -> dict[str, Layout]:
    qkv = Layout("kv", 0, (cfg.q_per_kv * cfg.head_dim, cfg.head_dim, cfg.head_dim))
    return {
        "wqkv": qkv,
        "bqkv": qkv,
        "wo": Layout("kv", 1, (cfg.q_per_kv * cfg.head_dim,)),
        "w13": Layout("ffn", 0, (1, 1)),  # gate rows, then up rows
        "w2": Layout("ffn", 1, (1,)),
    }


def _step(dtype: str | torch.dtype, ndim: int, axis: int) -> int:
    """Columns per element along `axis`: a block of BLOCK for the columns of a stored quantised
    matrix (U8 [N, K/32, block bytes]), else 1."""
    return BLOCK if axis == 1 and ndim == 3 and dtype in ("U8", torch.uint8) else 1


Pieces = dict[str, list[torch.Tensor]]  # each tensor as pieces to concatenate along dim 0


def read_part(path: Path, cfg: ModelConfig, have: tuple[Span, Span], kv: Span, ffn: Span) -> Pieces:
    """Units kv and ffn (absolute, inside `have`, the (kv, ffn) ranges the file holds) of a layer
    file, as the file of a share with exactly those ranges holds them; reads only their bytes.
    A tensor comes as its segments (wqkv: [q, k, v] rows; w2: [its columns])."""
    want = {"kv": kv, "ffn": ffn}
    base = {"kv": have[0], "ffn": have[1]}
    for u in want:
        lo, hi = want[u]
        if lo < hi and not base[u][0] <= lo < hi <= base[u][1]:
            raise PartError(f"units {u} {lo}-{hi} are not in {path.name} ({u} {base[u][0]}-{base[u][1]})")
    out = {}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            lay = layouts(cfg)[name]
            (lo, hi), (b0, b1) = want[lay.unit], base[lay.unit]
            if lo >= hi:
                continue
            sl = f.get_slice(name)
            step = _step(sl.get_dtype(), len(sl.get_shape()), lay.axis)
            pieces, off = [], 0
            for per in lay.per:
                a, b = off + (lo - b0) * per, off + (hi - b0) * per
                if a % step or b % step:
                    raise PartError(f"{path.name} {name}: units {lo}-{hi} split a quantised block")
                idx = slice(a // step, b // step)
                pieces.append(sl[idx] if lay.axis == 0 else sl[:, idx])
                off += (b1 - b0) * per
            out[name] = pieces
    return out


def _segments(t: torch.Tensor | list[torch.Tensor], lay: Layout) -> list[torch.Tensor]:
    """A part's tensor as its segments (read_part gives them so; a decoded file, one tensor)."""
    if isinstance(t, list):
        return t
    step = _step(t.dtype, t.dim(), lay.axis)
    units, off, out = t.shape[lay.axis] * step // sum(lay.per), 0, []
    for per in lay.per:
        out.append(t.narrow(lay.axis, off, units * per // step))
        off += units * per // step
    return out


def join_parts(parts: list[dict[str, torch.Tensor | list[torch.Tensor]]], cfg: ModelConfig) -> Pieces:
    """Adjacent parts, in unit order (as read_part or decode give them) -> the layer of their
    union, each tensor as the pieces that make it row after row (write_tensors writes them as they
    are; only column-wise tensors are copied, into one)."""
    out = {}
    for name, lay in layouts(cfg).items():
        have = [_segments(p[name], lay) for p in parts if name in p]
        if len({(t.dtype, t.shape[: lay.axis] + t.shape[lay.axis + 1 :]) for seg in have for t in seg}) > 1:
            raise PartError(f"{name}: the parts differ in format")
        if not have:
            continue
        rows = [seg[i] for i in range(len(lay.per)) for seg in have]  # segment by segment, parts in order
        out[name] = rows if lay.axis == 0 else [torch.cat(rows, dim=1)]  # (columns: one segment)
    return out


def part_file(path: Path, cfg: ModelConfig, have: tuple[Span, Span], kv: Span, ffn: Span) -> list[memoryview]:
    """read_part as a safetensors file, in pieces (what FetchShard sends for a unit range)."""
    head, data = encode(read_part(path, cfg, have, kv, ffn))
    return [memoryview(head), *data]


def decode(data: bytearray) -> dict[str, torch.Tensor]:
    """A safetensors file in memory -> its tensors, views into `data` (no copy)."""
    if not data:
        return {}
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8 : 8 + n]))
    header.pop("__metadata__", None)
    raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) > 8 + n else torch.empty(0, dtype=torch.uint8)
    base, out = 8 + n, {}
    for name, meta in header.items():
        a, b = meta["data_offsets"]
        out[name] = raw[base + a : base + b].view(SAFETENSORS[meta["dtype"]]).view(meta["shape"])
    return out


@dataclass(frozen=True)
class Reuse:
    """How to make a layer file of a new share from cached ones: cut the units `keep` out of the
    files of cached sets (`kv_from` / `ffn_from`: a set's folder and the ranges it holds) and fetch
    the units before and after them (`before`, `after`: (kv, ffn) ranges) from the master."""

    kv_from: tuple[Path, tuple[Span, Span]] | None
    ffn_from: tuple[Path, tuple[Span, Span]] | None
    keep: tuple[Span, Span]
    before: tuple[Span, Span] | None
    after: tuple[Span, Span] | None

    @staticmethod
    def plan(name: str, new: tuple[Span, Span], sets: list[tuple[Path, Span, Span]]) -> Reuse | None:
        """Per unit kind, the cached set (among `sets` whose file `name` is there) holding most of
        `new`'s range; None when none holds any of its units."""
        have = [(d, (kv, ffn)) for d, kv, ffn in sets if (d / name).is_file()]
        picks, keep = [], []
        for u, (lo, hi) in enumerate(new):
            overlap = lambda h: min(hi, h[1][u][1]) - max(lo, h[1][u][0])  # noqa: E731, B023
            pick = max(have, key=overlap, default=None)
            if pick is None or overlap(pick) <= 0:
                picks.append(None)
                keep.append((hi, hi))  # nothing cached: all of the range comes before it
            else:
                picks.append(pick)
                keep.append((max(lo, pick[1][u][0]), min(hi, pick[1][u][1])))
        if picks == [None, None]:
            return None
        before = tuple((lo, k[0]) for (lo, _), k in zip(new, keep))
        after = tuple((k[1], hi) for (_, hi), k in zip(new, keep))
        some = lambda p: p if any(a < b for a, b in p) else None  # noqa: E731
        return Reuse(picks[0], picks[1], tuple(keep), some(before), some(after))

    def assemble(
        self, name: str, cfg: ModelConfig, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
    ) -> Pieces:
        """The layer file's tensors: the fetched parts around the units cut from cached files
        (PartError when they do not fit together)."""
        (kv, ffn), cached = self.keep, []
        if self.kv_from is not None:
            cached.append(read_part(self.kv_from[0] / name, cfg, self.kv_from[1], kv, (0, 0)))
        if self.ffn_from is not None:
            cached.append(read_part(self.ffn_from[0] / name, cfg, self.ffn_from[1], (0, 0), ffn))
        return join_parts([before, *cached, after], cfg)


def layer_file(i: int) -> str:
    return f"layer-{i:03d}.safetensors"


def shard_files(cfg: ModelConfig, head: bool = False) -> list[str]:
    """A slice set's files (`head`: with the rows of a split head)."""
    return ["norms.safetensors"] + [layer_file(i) for i in range(cfg.num_layers)] + ([HEAD_FILE] if head else [])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


ST_DTYPES = {v: k for k, v in SAFETENSORS.items()}


def encode(tensors: dict[str, torch.Tensor] | Pieces) -> tuple[bytes, list[memoryview]]:
    """A safetensors file laid out as safetensors' own writer does (tensors by dtype width, then
    name; the header padded to 8 bytes): (header, the data in order, views of the tensors'
    memory: nothing is copied). A tensor given as a list is its pieces, concatenated along dim 0."""
    pieces = {k: [p.contiguous() for p in v] if isinstance(v, list) else [v.contiguous()] for k, v in tensors.items()}
    head, data, at = {}, [], 0
    for name in sorted(pieces, key=lambda k: (-pieces[k][0].element_size(), k)):
        ps = pieces[name]
        n = sum(p.numel() * p.element_size() for p in ps)
        shape = [sum(p.shape[0] for p in ps), *ps[0].shape[1:]]
        head[name] = {"dtype": ST_DTYPES[ps[0].dtype], "shape": shape, "data_offsets": [at, at + n]}
        data += [memoryview(p.reshape(-1).view(torch.uint8).numpy()) for p in ps if p.numel()]
        at += n
    js = json.dumps(head, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, data


def write_tensors(path: Path, tensors: dict[str, torch.Tensor] | Pieces) -> str:
    """Write `tensors` as a safetensors file at `path` (encode's layout: the same tensors give the
    same bytes, whoever writes them), hashing as it writes. -> the file's sha256."""
    head, data = encode(tensors)
    h = hashlib.sha256(head)
    with open(path, "wb") as f:
        f.write(head)
        for mv in data:
            f.write(mv)
            h.update(mv)
    return h.hexdigest()


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """write_tensors into a temporary file renamed into place. -> the file's sha256."""
    tmp = path.with_suffix(".tmp")
    sha = write_tensors(tmp, tensors)
    os.replace(tmp, path)
    return sha


def manifest(out_dir: Path, sums: dict[str, str]) -> list[ShardFile]:
    """The ShardFile of every file in `sums` ({file: sha256}, as write_node_shards returns)."""
    return [ShardFile(f, (out_dir / f).stat().st_size, h) for f, h in sums.items()]


def write_head(
    model_dir: str | Path, cfg: ModelConfig, rows: tuple[int, int], out: Path, dtype: torch.dtype, quant: str
) -> str:
    """Rows [a, b) of the lm_head into out/HEAD_FILE. -> the file's sha256."""
    reader = open_checkpoint(model_dir)
    try:
        name = head_name(reader, cfg)
        if reader.shape(name)[0] != cfg.vocab_size:
            raise UserError(f"{name} has {reader.shape(name)[0]} rows but config.json says vocab_size {cfg.vocab_size}")
        w = load_rows(reader, name, dtype, "cpu", quant, *rows)
    finally:
        reader.close()
    return save_atomic({"lm_head": w.data if isinstance(w, QMatrix) else w}, out / HEAD_FILE)


WRITERS = 2  # threads writing and hashing slices while the next layer is cut


def write_node_shards(
    model_dir: str | Path,
    cfg: ModelConfig,
    plan: PartitionPlan,
    rank: int,
    out_dir: Path,
    dtype: str = "fp32",
    progress: bool = True,
    quant: str = "none",
    head: bool = False,
) -> dict[str, str]:
    """Write rank's slices (one file per layer + norms, + its lm_head rows when `head`: the head is
    split by vocabulary) into out_dir; returns {file: sha256}.

    Files already present (from an earlier run with the same plan) are kept; a `MANIFEST` file
    with the sha256 of each file is written last, so an interrupted run is simply resumed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.label(out_dir, Path(model_dir).name)
    manifest = out_dir / "MANIFEST"
    wanted, known = shard_files(cfg, head), {}
    if manifest.is_file():  # (a set sliced before without the head's rows: its files' sums stand)
        known = dict(line.split("  ", 1)[::-1] for line in manifest.read_text().splitlines() if line)
        if all(f in known and (out_dir / f).is_file() for f in wanted):
            return {f: known[f] for f in wanted}
    reader = open_checkpoint(model_dir)
    share, td = plan.share_of(rank), torch_dtype(dtype)
    t0, written, sums, writing = time.monotonic(), 0, {}, deque()
    # layers are cut here, in order (a checkpoint reader is not shared between threads), and written
    # and hashed on WRITERS threads meanwhile; at most WRITERS + 1 layers are held at once
    pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="tpi-slice-writer")
    for i in range(cfg.num_layers):
        path = out_dir / layer_file(i)
        if not path.is_file():
            tensors = stored_layer(slice_layer(reader, cfg, share, i), td, quant)
            if len(writing) == WRITERS:
                name, job = writing.popleft()
                sums[name] = job.result()
            writing.append((path.name, pool.submit(save_atomic, tensors, path)))
            written += sum(t.numel() * t.element_size() for t in tensors.values())
        if progress and (i % 8 == 7 or i == cfg.num_layers - 1):
            print(
                f"[tpi-node] slicing rank {rank}: layer {i + 1}/{cfg.num_layers} "
                f"({written / 2**20:.0f} MiB, {time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    sums.update((name, job.result()) for name, job in writing)
    pool.shutdown()
    norms = out_dir / "norms.safetensors"
    if not norms.is_file():
        sums[norms.name] = save_atomic({k: v.to(td) for k, v in read_norms(reader, cfg).items()}, norms)
    if head and not (out_dir / HEAD_FILE).is_file():
        sums[HEAD_FILE] = write_head(model_dir, cfg, share.vocab_rows(cfg), out_dir, td, quant)
    sums = {f: sums.get(f) or known.get(f) or sha256_file(out_dir / f) for f in wanted}  # (hashed as written)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sums.items()))
    os.replace(tmp, manifest)
    return sums
