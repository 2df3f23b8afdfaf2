"""Model shapes by name: Hugging Face config.json dicts.

The real presets carry the published shapes of each family, so `tpi-node synth llama2-70b`
produces a checkpoint that partitions, streams and communicates exactly like the real one (with
random weights). The tiny presets are for tests: small enough to run a forward in milliseconds,
shaped to hit the interesting cases (GQA, uneven head splits, biases, tied embeddings, llama3
rope scaling).

Only standard HF keys are used (legacy `rope_theta` / `rope_scaling` spelling, which every
transformers release reads), so transformers itself can load what `synthesize` writes.
"""

from __future__ import annotations

import copy


def _llama(
    hidden: int,
    ffn: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    *,
    max_pos: int,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    tied: bool = False,
    bos: int = 1,
    eos: int | list[int] = 2,
    rms_eps: float = 1e-5,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_pos,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
    }


def _qwen2(
    hidden: int,
    ffn: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    *,
    max_pos: int,
    rope_theta: float = 1000000.0,
    tied: bool = True,
    bos: int = 151643,
    eos: int | list[int] = 151643,
    rms_eps: float = 1e-6,
) -> dict:
    # Qwen2 = llama with biases on q/k/v (never on o_proj) and no attention_bias switch.
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": max_pos,
        "sliding_window": max_pos,
        "use_sliding_window": False,
        "max_window_layers": layers,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
    }


def _llama3_scaling(factor: float, original_max: int) -> dict:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max,
    }


PRESETS: dict[str, dict] = {
    # Real shapes (published config.json of each model).
    "llama2-7b": _llama(4096, 11008, 32, 32, 32, 32000, max_pos=4096),
    "llama2-13b": _llama(5120, 13824, 40, 40, 40, 32000, max_pos=4096),
    "llama2-70b": _llama(8192, 28672, 80, 64, 8, 32000, max_pos=4096),
    "llama3-8b": _llama(4096, 14336, 32, 32, 8, 128256, max_pos=8192, rope_theta=500000.0, bos=128000, eos=128001),
    "llama3.2-1b": _llama(
        2048,
        8192,
        16,
        32,
        8,
        128256,
        max_pos=131072,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(32.0, 8192),
        tied=True,
        bos=128000,
        eos=128001,
    ),
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, max_pos=32768),
    # Tiny test presets. vocab 512 leaves room for the synthetic byte-level tokenizer.
    "tiny-llama": _llama(64, 160, 4, 4, 2, 512, max_pos=2048),
    "tiny-qwen2": _qwen2(96, 224, 3, 6, 3, 512, max_pos=2048, tied=False),
    # original_max 64 with head_dim 16: some rope frequencies are scaled, some smoothed,
    # some untouched, so all three branches of the llama3 formula are exercised.
    "tiny-llama3": _llama(
        96, 256, 3, 6, 3, 512, max_pos=2048, rope_theta=500000.0, rope_scaling=_llama3_scaling(8.0, 64), tied=True
    ),
}


def get_preset(name: str) -> dict:
    """A fresh copy of the preset's config dict (callers may edit it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
