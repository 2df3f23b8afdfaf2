"""Synthetic checkpoints: any preset shape, random weights, written shard by shard.

`synthesize("llama2-70b", out, layers=4)` gives a directory that looks exactly like a Hugging Face
checkpoint (config.json, sharded safetensors + index, tokenizer) so the whole serving path -
partitioning, streaming, the wire, the API - can be exercised at real shapes without real
weights. Values are deterministic per (seed, tensor name), so the first layers of a 4-layer and
a 32-layer synthesis are identical, and no more than one layer is ever held in memory.

With `quant` int8 / int4 the matrices are written straight as quantised blocks (U8 tensors
[N, K/32, block bytes], model/quant.py; the embedding and lm_head as q8_0), so 70B shapes fit on
disk; only tpi-node reads such a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpi_node.model.presets import get_preset
from tpi_node.model.quant import QUANT_FORMAT, quantizable, quantize

DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}
WEIGHT_STD = 0.02
BIAS_STD = 0.02
NORM_STD = 0.02  # norm weights are 1 + N(0, NORM_STD)

# The synthetic tokenizer: a few specials, then the 256 byte-level tokens (ids 5..260).
SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"tpi-node synth: {msg}", file=sys.stderr, flush=True)


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per tensor, keyed by its name: values do not depend on write order or on
    # how many layers are synthesized.
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _normal(name: str, shape: tuple[int, ...], seed: int, mean: float, std: float, dtype: torch.dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(mean, std, generator=_generator(seed, name))
    return t.to(dtype)


def tensor_shapes(cfg: dict) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """Per shard: (HF name, shape, kind) with kind in weight|bias|norm. Shard 0 holds the
    embeddings, shard 1+i layer i, the last shard the final norm (+ lm_head unless tied)."""
    h, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    qkv_bias = cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))
    o_bias = cfg["model_type"] != "qwen2" and bool(cfg.get("attention_bias"))
    shards = [[("model.embed_tokens.weight", (vocab, h), "weight")]]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (heads * hd, h), "weight"),
            (p + "self_attn.k_proj.weight", (kv * hd, h), "weight"),
            (p + "self_attn.v_proj.weight", (kv * hd, h), "weight"),
            (p + "self_attn.o_proj.weight", (h, heads * hd), "weight"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (ffn, h), "weight"),
            (p + "mlp.up_proj.weight", (ffn, h), "weight"),
            (p + "mlp.down_proj.weight", (h, ffn), "weight"),
        ]
        if qkv_bias:
            layer += [
                (p + "self_attn.q_proj.bias", (heads * hd,), "bias"),
                (p + "self_attn.k_proj.bias", (kv * hd,), "bias"),
                (p + "self_attn.v_proj.bias", (kv * hd,), "bias"),
            ]
        if o_bias:
            layer.append((p + "self_attn.o_proj.bias", (h,), "bias"))
        shards.append(layer)
    last = [("model.norm.weight", (h,), "norm")]
    if not cfg.get("tie_word_embeddings", False):
        last.append(("lm_head.weight", (vocab, h), "weight"))
    shards.append(last)
    return shards


def _make(name: str, shape: tuple[int, ...], kind: str, seed: int, dtype: torch.dtype):
    if kind == "norm":
        return _normal(name, shape, seed, 1.0, NORM_STD, dtype)
    return _normal(name, shape, seed, 0.0, BIAS_STD if kind == "bias" else WEIGHT_STD, dtype)


def _stored(name: str, t: torch.Tensor, quant: str) -> torch.Tensor:
    """A weight as written: its blocks under --quant (the embedding / lm_head at q8_0)."""
    if quant == "none" or not quantizable(t):
        return t
    fmt = "q8_0" if name in ("model.embed_tokens.weight", "lm_head.weight") else QUANT_FORMAT[quant]
    return quantize(t, fmt).data


def synthesize(
    preset: str,
    out: str | Path,
    layers: int | None = None,
    dtype: str = "fp32",
    seed: int = 0,
    progress: bool = True,
    quant: str = "none",
) -> Path:
    """Write a random checkpoint of `preset`'s shape into `out`; returns `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = get_preset(preset)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    if cfg["vocab_size"] < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"preset {preset!r} has vocab_size {cfg['vocab_size']}, too small for the synthetic byte-level tokenizer"
        )
    torch_dtype, dtype_name = DTYPES[dtype]
    # The synthetic tokenizer's ids replace the real model's special ids.
    cfg.update(torch_dtype=dtype_name, bos_token_id=BOS_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    start = time.perf_counter()
    shards = tensor_shapes(cfg)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {
            name: _stored(name, _make(name, shape, kind, seed, torch_dtype), quant) for name, shape, kind in entries
        }
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        total += size
        weight_map.update({name: fname for name in tensors})
        del tensors
        _say(progress, f"shard {i + 1}/{n} {fname} ({size / 1e6:.1f} MB, {total / 1e6:.1f} MB total)")
    index = {"metadata": {"total_size": total, "tpi_synthetic_preset": preset, "seed": seed}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS_ID, "eos_token_id": [IM_END_ID, EOS_ID], "pad_token_id": PAD_ID}, indent=2)
        + "\n"
    )
    write_tokenizer(out, model_max_length=cfg["max_position_embeddings"])
    _say(
        progress,
        f"done: {preset} x {cfg['num_hidden_layers']} layers, {dtype}{'' if quant == 'none' else ', ' + quant}, "
        f"{total / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s -> {out}",
    )
    return out


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-in for every byte (what the ByteLevel pre-tokenizer produces).
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_tokenizer(out: Path, model_max_length: int = 2048) -> None:
    """Byte-level BPE without merges: every byte is one token (ids 5..260), plus specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = len(SPECIAL_TOKENS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[IM_END_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
