"""GGUF files for tests, written with gguf-py (a test-only dependency) from random blocks."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from tpi_node.weights.gguf import GgufFile, hf_config


def k_quant_rows(rng, rows: int, cols: int, gtype: str):
    """Random bytes of a Q4_K / Q6_K / Q5_0 / Q5_1 tensor (every bit pattern of its quants and
    sub-block scales) with sane fp16 block scales (d, and dmin or m): (uint8 [rows, bytes], ggml type)."""
    weights, size, scales_at = {
        "Q4_K": (256, 144, [0, 2]),
        "Q6_K": (256, 210, [208]),
        "Q5_0": (32, 22, [0]),
        "Q5_1": (32, 24, [0, 2]),
    }[gtype]
    raw = rng.integers(0, 256, (rows, cols // weights * size), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, size)
    for at in scales_at:
        scale = rng.random((*blocks.shape[:2], 1)) * 0.002 + 0.0005
        blocks[..., at : at + 2] = scale.astype(np.float16).view(np.uint8)
    return raw, getattr(gguf.GGMLQuantizationType, gtype)


def write_k_quant_llama(d: Path) -> Path:
    """A 3-layer Llama (hidden 256, 4 heads, 2 KV heads) in d: model.gguf and its config.json. Its
    tensors mix types as a Q4_K_M file does: Q4_K, with Q6_K for the output and ffn_down and for
    layer 0's attn_v (whose fused q|k|v is then q8_mix blocks), and in layer 1 the Q5_0 / Q5_1
    llama.cpp falls back to where a row does not split into 256s (gate|up then mixed)."""
    rng = np.random.default_rng(0)
    hidden, ffn, vocab, layers = 256, 512, 320, 3
    w = gguf.GGUFWriter(str(d / "model.gguf"), "llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)

    def add(name, rows, cols, gtype):
        raw, qtype = k_quant_rows(rng, rows, cols, gtype)
        w.add_tensor(name, raw, raw_dtype=qtype)

    def norm(name):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    add("token_embd.weight", vocab, hidden, "Q4_K")
    add("output.weight", vocab, hidden, "Q6_K")
    norm("output_norm.weight")
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        for name, rows in [("attn_q", hidden), ("attn_k", 128), ("attn_v", 128)]:
            add(f"blk.{i}.{name}.weight", rows, hidden, "Q6_K" if name == "attn_v" and i == 0 else "Q4_K")
        add(f"blk.{i}.attn_output.weight", hidden, hidden, "Q5_0" if i == 1 else "Q4_K")
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden, "Q5_1" if i == 1 else "Q4_K")
        add(f"blk.{i}.ffn_up.weight", ffn, hidden, "Q4_K")
        add(f"blk.{i}.ffn_down.weight", hidden, ffn, "Q6_K")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (d / "config.json").write_text(json.dumps(hf_config(GgufFile(d / "model.gguf"))))
    return d
