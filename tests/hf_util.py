"""Helpers for comparing our model math with Hugging Face transformers (test-only dependency)."""

from __future__ import annotations

from pathlib import Path

import torch

from tpi_node.comm.collective import LocalCollective
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.blocks import BlockPool
from tpi_node.engine.device import device_capacity, select_device
from tpi_node.engine.head import ModelHead
from tpi_node.engine.runner import open_runner
from tpi_node.model.config import ModelConfig
from tpi_node.weights.checkpoint import model_digest
from tpi_node.weights.plan import make_plan

HF_CONFIGS = {
    "llama": dict(
        model_type="llama",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=144,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=300,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "llama3": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


def make_hf_model(kind: str, out: Path, seed: int = 0):
    """A random HF model of one of HF_CONFIGS, saved as safetensors in `out`; returns it (fp32)."""
    import transformers

    torch.manual_seed(seed)
    d = dict(HF_CONFIGS[kind])
    cls = transformers.Qwen2Config if d.pop("model_type") == "qwen2" else transformers.LlamaConfig
    cfg = cls(**d)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise to test them
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return model


class OurModel:
    """Single-node runner + head over a model dir: logits for every new token of a step."""

    def __init__(
        self, model_dir: Path, dtype: str = "fp32", window: int | None = None, kv_blocks: int = 512, quant: str = "none"
    ) -> None:
        self.cfg = ModelConfig.from_dir(model_dir)
        plan = make_plan(self.cfg, [device_capacity("test", select_device("cpu"))], model_digest(model_dir))
        self.runner = open_runner(
            model_dir,
            self.cfg,
            plan,
            0,
            LocalCollective(),
            dtype,
            window,
            progress=False,
            kv_blocks=kv_blocks,
            quant=quant,
        )
        self.head = ModelHead(model_dir, self.cfg, quant=quant)
        self.pool = BlockPool(kv_blocks, prefix_cache=False)  # the engine's block tables, without the engine

    def step(self, seq_id: int, past: int, ids: list[int]) -> torch.Tensor:
        if seq_id not in self.pool.tables:
            assert past == 0 and self.pool.admit(seq_id, ids, need=len(ids)) == 0
        assert self.pool.grow(seq_id, past + len(ids))
        layout = BatchLayout((seq_id,), (past,), (len(ids),), (self.pool.table(seq_id),))
        return self.head.logits(self.runner.forward(layout, self.head.embed(ids)))  # [n, V]

    def free(self, seq_ids) -> None:
        for s in seq_ids:
            self.pool.release(s)

    def greedy(self, ids: list[int], n: int, seq_id: int = 1) -> list[int]:
        out, logits = [], self.step(seq_id, 0, ids)
        for _ in range(n):
            t = int(logits[-1].argmax())
            out.append(t)
            logits = self.step(seq_id, len(ids) + len(out) - 1, [t])
        self.free([seq_id])
        return out
