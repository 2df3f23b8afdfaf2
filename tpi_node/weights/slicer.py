"""Cutting one node's slices out of a checkpoint, and the on-disk shard cache.

Weight loading is data: `LAYER_NAMES` maps our roles to Hugging Face tensor names, and
`slice_layer` cuts rows or columns by the node's KV-head range and FFN range. Each node keeps its
slices as one safetensors file per layer plus `norms.safetensors` (every RMSNorm weight; tiny,
always resident) in a folder named by the model and plan digests, the dtype and --quant.

Quantised matrices (a GGUF's blocks, or float weights under --quant int8 / int4) are written as
their blocks: a U8 tensor [N, K/32, block bytes] (model/quant.py), so every shard on disk, every
FetchShard stream and every window slot holds the quantised bytes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpi_node.dtypes import torch_dtype
from tpi_node.model.config import ModelConfig
from tpi_node.model.quant import QMatrix, cat_rows, quantizable, quantize_for
from tpi_node.paths import shards_dir
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.weights.checkpoint import CheckpointReader, GgufReader, Weight, open_checkpoint
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
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


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


def slice_layer(reader: CheckpointReader | GgufReader, cfg: ModelConfig, share: NodeShare, i: int) -> dict[str, Weight]:
    """One node's tensors of layer i (see model/layers.py LayerWeights for the shapes)."""
    n = {k: v.format(i=i) for k, v in LAYER_NAMES.items()}
    hd, g = cfg.head_dim, cfg.q_per_kv
    out: dict[str, torch.Tensor] = {}
    if share.n_kv:
        q0, q1 = share.kv_start * g * hd, share.kv_end * g * hd  # query rows of our heads
        k0, k1 = share.kv_start * hd, share.kv_end * hd
        out["wqkv"] = cat_rows(
            [
                reader.rows(n["q"] + ".weight", q0, q1),
                reader.rows(n["k"] + ".weight", k0, k1),
                reader.rows(n["v"] + ".weight", k0, k1),
            ]
        )
        if cfg.attention_bias:
            out["bqkv"] = torch.cat(
                [
                    reader.rows(n["q"] + ".bias", q0, q1),
                    reader.rows(n["k"] + ".bias", k0, k1),
                    reader.rows(n["v"] + ".bias", k0, k1),
                ]
            )
        out["wo"] = reader.cols(n["o"] + ".weight", q0, q1)
    if share.n_ffn:
        f0, f1 = share.ffn_start, share.ffn_end
        out["w13"] = cat_rows([reader.rows(n["gate"] + ".weight", f0, f1), reader.rows(n["up"] + ".weight", f0, f1)])
        out["w2"] = reader.cols(n["down"] + ".weight", f0, f1)
    return out


def read_norms(reader: CheckpointReader | GgufReader, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """All RMSNorm weights: input.{i}, post.{i}, final."""
    out = {"final": reader.get(FINAL_NORM)}
    for i in range(cfg.num_layers):
        out[f"input.{i}"] = reader.get(LAYER_NAMES["input_norm"].format(i=i))
        out[f"post.{i}"] = reader.get(LAYER_NAMES["post_norm"].format(i=i))
    return out


def shard_dir(model_digest: str, plan: PartitionPlan, rank: int, dtype: str, quant: str = "none") -> Path:
    """A cache made for another dtype or --quant is another folder: never reused by mistake."""
    kind = dtype if quant == "none" else f"{dtype}-{quant}"
    return shards_dir() / model_digest[:12] / f"{plan.digest[:16]}-{kind}" / f"rank-{rank}"


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


def layer_file(i: int) -> str:
    return f"layer-{i:03d}.safetensors"


def shard_files(cfg: ModelConfig) -> list[str]:
    return ["norms.safetensors"] + [layer_file(i) for i in range(cfg.num_layers)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def manifest(out_dir: Path, sums: dict[str, str]) -> list[ShardFile]:
    """The ShardFile of every file in `sums` ({file: sha256}, as write_node_shards returns)."""
    return [ShardFile(f, (out_dir / f).stat().st_size, h) for f, h in sums.items()]


def write_node_shards(
    model_dir: str | Path,
    cfg: ModelConfig,
    plan: PartitionPlan,
    rank: int,
    out_dir: Path,
    dtype: str = "fp32",
    progress: bool = True,
    quant: str = "none",
) -> dict[str, str]:
    """Write rank's slices (one file per layer + norms) into out_dir; returns {file: sha256}.

    Files already present (from an earlier run with the same plan) are kept; a `MANIFEST` file
    with the sha256 of each file is written last, so an interrupted run is simply resumed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "MANIFEST"
    if manifest.is_file():
        sums = dict(line.split("  ", 1)[::-1] for line in manifest.read_text().splitlines() if line)
        if all((out_dir / f).is_file() for f in sums):
            return sums
    reader = open_checkpoint(model_dir)
    share, td = plan.share_of(rank), torch_dtype(dtype)
    t0, written = time.monotonic(), 0
    for i in range(cfg.num_layers):
        path = out_dir / layer_file(i)
        if not path.is_file():
            tensors = stored_layer(slice_layer(reader, cfg, share, i), td, quant)
            _save_atomic(tensors, path)
            written += sum(t.numel() * t.element_size() for t in tensors.values())
        if progress and (i % 8 == 7 or i == cfg.num_layers - 1):
            print(
                f"[tpi-node] slicing rank {rank}: layer {i + 1}/{cfg.num_layers} "
                f"({written / 2**20:.0f} MiB, {time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    norms = out_dir / "norms.safetensors"
    if not norms.is_file():
        _save_atomic({k: v.to(td) for k, v in read_norms(reader, cfg).items()}, norms)
    sums = {f: sha256_file(out_dir / f) for f in shard_files(cfg)}
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sums.items()))
    os.replace(tmp, manifest)
    return sums
