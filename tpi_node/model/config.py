"""ModelConfig: the shapes of a Llama / Mistral / Qwen2 checkpoint, read from its config.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tpi_node.errors import UserError

SUPPORTED = {"llama", "mistral", "qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    attention_bias: bool
    rope_scaling: tuple = ()  # sorted (key, value) items of HF's rope_scaling dict
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    digest: str = field(default="", compare=False)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        arch = d.get("model_type", "llama")
        if arch not in SUPPORTED:
            raise UserError(f"model_type '{arch}' is not supported (supported: {', '.join(sorted(SUPPORTED))})")
        heads = d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or heads
        if heads % kv:
            raise UserError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # transformers >= 5 writes `rope_parameters` (theta + scaling) instead of the two keys
        rp = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {k: v for k, v in rp.items() if k != "rope_theta"}
        theta = d.get("rope_theta") or rp.get("rope_theta") or 10000.0
        canon = json.dumps(d, sort_keys=True).encode()
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position=int(d.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them when attention_bias is set.
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            rope_scaling=tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (dict, list)))),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            digest=hashlib.sha256(canon).hexdigest(),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UserError(f"no config.json in {model_dir}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: malformed config ({e})") from None

    def layer_param_count(self) -> int:
        """Parameters of one decoder layer (the matrices; norms are negligible)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * h * self.intermediate_size
