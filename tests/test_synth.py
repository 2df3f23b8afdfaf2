"""Synthetic checkpoints: real shapes (checked against transformers and published sizes),
sharding, determinism, loadability."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from tpi_node.model.presets import PRESETS, get_preset
from tpi_node.model.tokenizer import Tokenizer
from tpi_node.weights.synth import synthesize, tensor_shapes

transformers = pytest.importorskip("transformers")

# Parameter counts published for the real models (model cards / HF safetensors metadata).
PUBLISHED_PARAMS = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "qwen2.5-0.5b": 494_032_768,
}
TINY = ["tiny-llama", "tiny-qwen2", "tiny-llama3"]


def _read_all(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("preset", list(PUBLISHED_PARAMS))
def test_real_preset_shapes_match_transformers_and_published_size(preset):
    cfg = get_preset(preset)
    ours = {name: shape for shard in tensor_shapes(cfg) for name, shape, _ in shard}
    assert sum(math.prod(s) for s in ours.values()) == PUBLISHED_PARAMS[preset]
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    hf = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        hf.pop("lm_head.weight")
    assert ours == hf


@pytest.mark.parametrize("preset", TINY)
def test_tiny_loads_in_transformers_without_missing_keys(tiny_model_dir, preset):
    path = tiny_model_dir(preset)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    written = _read_all(path)
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name  # loaded exactly what we wrote
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, PRESETS[preset]["vocab_size"]) and torch.isfinite(logits).all()


def test_sharding_index_and_statistics(tiny_model_dir):
    path = tiny_model_dir("tiny-qwen2")
    cfg = json.loads((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    n_layers = cfg["num_hidden_layers"]
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{n_layers + 2:05d}.safetensors" for i in range(1, n_layers + 3)]
    assert sorted(p.name for p in path.glob("*.safetensors")) == files
    wm = index["weight_map"]
    assert wm["model.embed_tokens.weight"] == files[0]
    for i in range(n_layers):  # one shard per layer
        assert {f for k, f in wm.items() if k.startswith(f"model.layers.{i}.")} == {files[i + 1]}
    assert wm["model.norm.weight"] == wm["lm_head.weight"] == files[-1]
    tensors = _read_all(path)
    assert set(tensors) == set(wm)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert "model.layers.0.self_attn.q_proj.bias" in tensors  # qwen2 biases
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert abs(float(q.std()) - 0.02) < 0.002 and abs(float(q.mean())) < 0.002
    norm = tensors["model.layers.1.input_layernorm.weight"]
    assert abs(float(norm.mean()) - 1.0) < 0.01
    assert float(tensors["model.layers.1.self_attn.k_proj.bias"].abs().max()) < 0.2


def test_tied_preset_has_no_lm_head(tiny_model_dir):
    tensors = _read_all(tiny_model_dir("tiny-llama3"))
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors


def test_deterministic_per_seed_and_layers_override(tiny_model_dir, tmp_path):
    a = _read_all(tiny_model_dir("tiny-llama", seed=0))
    b = _read_all(synthesize("tiny-llama", tmp_path / "again", seed=0, progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _read_all(tiny_model_dir("tiny-llama", seed=1))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    two = tiny_model_dir("tiny-llama", layers=2)
    assert json.loads((two / "config.json").read_text())["num_hidden_layers"] == 2
    d = _read_all(two)
    assert not any(k.startswith("model.layers.2.") for k in d)
    assert all(torch.equal(d[k], a[k]) for k in d)  # same values as the first layers


def test_bf16(tiny_model_dir):
    path = tiny_model_dir("tiny-llama", dtype="bf16")
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in _read_all(path).values()} == {torch.bfloat16}


def test_synthetic_tokenizer_serves(tiny_model_dir):
    path = tiny_model_dir("tiny-llama")
    tok = Tokenizer.from_dir(path)
    cfg = json.loads((path / "config.json").read_text())
    ids = tok.encode("héllo 😀 <|im_end|>")
    assert max(ids) < cfg["vocab_size"] and tok.vocab_size <= cfg["vocab_size"]
    assert tok.decode(ids) == "héllo 😀 "
    assert cfg["eos_token_id"] in tok.eos_token_ids and tok.id_to_token(cfg["eos_token_id"]) == "<|im_end|>"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        synthesize("nope", tmp_path)
    with pytest.raises(ValueError, match="layers"):
        synthesize("tiny-llama", tmp_path, layers=0)
    with pytest.raises(ValueError, match="dtype"):
        synthesize("tiny-llama", tmp_path, dtype="fp8")
