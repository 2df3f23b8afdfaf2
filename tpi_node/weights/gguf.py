"""GGUF files read natively: header, metadata, tensor table, and the bytes of each tensor.

    g = GgufFile("model.gguf")        # parses the header, memory-maps the file read-only
    g.metadata["llama.block_count"]   # decoded values: str, int, float, bool, lists
    g.tensors["blk.0.ffn_down.weight"]  # GgufTensor(type="Q4_1", shape=(576, 1536), offset, nbytes)
    g.raw("token_embd.weight")        # uint8 view of exactly that tensor's bytes (no copy)

Besides the parser: `hf_config` turns the metadata into a Hugging Face config.json dict, and
`write_tokenizer` turns the vocabulary into tokenizer.json + tokenizer_config.json, so a GGUF is
served as it is, with no dequantised copy. numpy, stdlib and `tokenizers` only.

The format (llama.cpp's docs/gguf.md): little-endian; magic "GGUF", u32 version (2 or 3), u64
tensor count, u64 metadata count; metadata as (string key, u32 value type, value); tensor infos
as (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset); then the data section,
aligned to `general.alignment` (default 32), with every offset relative to its start. A string
is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64 count and the
elements. Shapes here are in torch order (ggml's ne reversed): a matrix is (rows, cols).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpi_node.errors import UserError

GGUF_NAME = "model.gguf"  # the GGUF inside a prepared model directory
MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, elements per block, bytes per block): llama.cpp's ggml type table.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# Metadata value types: id -> (struct format, size) for the fixed-size ones.
_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    _BOOL: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8", 11: "<i8", 12: "<f8"}
_MAX_DIMS = 8  # ggml has 4; anything far beyond is a corrupt file, not a bigger tensor


class GgufError(UserError):
    """A file that is not a GGUF we can read, or a request it cannot answer; one line, naming the file."""


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type: str  # ggml type name ("F32", "Q4_1", ...); an id missing from GGML_TYPES is f"type{id}"
    shape: tuple[int, ...]  # torch order: (rows, cols) for a matrix, (n,) for a vector
    offset: int  # absolute byte offset in the file
    nbytes: int  # 0 for a type missing from GGML_TYPES (its size is unknown; raw() refuses it)


class _Cursor:
    """Reads the header from the mapped bytes, refusing to step past the end of the file.
    keep_arrays=False steps over array values (None in their place)."""

    def __init__(self, buf: memoryview, path: Path, keep_arrays: bool = True) -> None:
        self.buf, self.path, self.pos, self.keep_arrays = buf, path, 0, keep_arrays

    def need(self, n: int, what: str) -> int:
        at = self.pos
        if n < 0 or at + n > len(self.buf):
            size = len(self.buf)
            raise GgufError(f"{self.path}: truncated GGUF file ({what} at byte {at} runs past its end at {size})")
        self.pos = at + n
        return at

    def scalar(self, vtype: int, what: str):
        fmt, size = _SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.need(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        at = self.need(n, what)
        return str(self.buf[at : at + n], "utf-8", "replace")

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.u32(what), self.u64(what)
            if etype in _NP_SCALARS or etype == _BOOL:
                dtype = np.dtype("<u1" if etype == _BOOL else _NP_SCALARS[etype])
                at = self.need(count * dtype.itemsize, what)
                if not self.keep_arrays:
                    return None
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=at)
                return [bool(v) for v in arr] if etype == _BOOL else arr.tolist()
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                self.need(count, what)
            if not self.keep_arrays and etype == _STRING:  # step over: only each string's length is read
                for _ in range(count):
                    self.need(self.u64(what), what)
                return None
            return [self.value(etype, what) for _ in range(count)]
        raise GgufError(f"{self.path}: corrupt GGUF file (unknown metadata value type {vtype} in {what})")


class GgufFile:
    """One GGUF file: metadata and tensor table parsed at once, tensor bytes mapped, not read.
    arrays=False leaves the metadata's arrays out (None): a reader of tensors alone then holds no
    copy of the vocabulary (SmolLM2's 49,152 tokens and 48,900 merges: ~8 MiB of Python strings)."""

    def __init__(self, path: str | Path, arrays: bool = True) -> None:
        self.path = Path(path)
        self.arrays = arrays
        try:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except FileNotFoundError:
            raise GgufError(f"{self.path}: no such GGUF file") from None
        except ValueError:  # numpy cannot map an empty file
            raise GgufError(f"{self.path}: not a GGUF file (it is empty)") from None
        except OSError as exc:
            raise GgufError(f"{self.path}: cannot read GGUF file: {exc.strerror or exc}") from None
        self._mm: np.memmap | None = mm
        self.metadata: dict[str, object] = {}
        self.tensors: dict[str, GgufTensor] = {}
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self._parse(memoryview(mm))

    def _parse(self, buf: memoryview) -> None:
        c = _Cursor(buf, self.path, self.arrays)
        if len(buf) < 8:
            raise GgufError(f"{self.path}: not a GGUF file (only {len(buf)} bytes)")
        if bytes(buf[:4]) != MAGIC:
            raise GgufError(f"{self.path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {MAGIC!r})")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in VERSIONS:
            hint = " (a big-endian file?)" if self.version & 0xFFFF == 0 else ""
            raise GgufError(f"{self.path}: unsupported GGUF version {self.version}{hint}; supported: 2, 3")
        n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
        for _ in range(n_kv):
            key = c.string("metadata key")
            self.metadata[key] = c.value(c.u32(f"metadata {key}"), f"metadata {key}")
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GgufError(f"{self.path}: corrupt GGUF file (general.alignment={align!r} is not a power of two)")
        self.alignment = align
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.u32(f"tensor {name}")
            if n_dims > _MAX_DIMS:
                raise GgufError(f"{self.path}: corrupt GGUF file (tensor {name} has {n_dims} dimensions)")
            ne = [c.u64(f"tensor {name}") for _ in range(n_dims)]
            infos.append((name, ne, c.u32(f"tensor {name}"), c.u64(f"tensor {name}")))
        self.data_offset = -(-c.pos // align) * align
        size = len(buf)
        for name, ne, type_id, rel in infos:
            if name in self.tensors:
                raise GgufError(f"{self.path}: corrupt GGUF file (tensor {name} appears twice)")
            type_name, block, block_bytes = GGML_TYPES.get(type_id, (f"type{type_id}", 0, 0))
            count = math.prod(ne)
            if block and ne and ne[0] % block:
                raise GgufError(
                    f"{self.path}: corrupt GGUF file (tensor {name}: row of {ne[0]} is not a multiple of "
                    f"the {type_name} block of {block})"
                )
            nbytes = count // block * block_bytes if block else 0
            offset = self.data_offset + rel
            if offset + nbytes > size:
                raise GgufError(
                    f"{self.path}: truncated GGUF file (tensor {name} ends at byte {offset + nbytes}, "
                    f"the file has {size})"
                )
            self.tensors[name] = GgufTensor(name, type_name, tuple(reversed(ne)), offset, nbytes)

    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a uint8 1-D view of the mapped file (read-only, nothing copied)."""
        t = self.tensors.get(name)
        if t is None:
            raise GgufError(f"{self.path}: no tensor {name!r} in this GGUF file")
        if self._mm is None:
            raise GgufError(f"{self.path}: the GGUF file is closed")
        if not t.nbytes and t.type.startswith("type"):
            raise GgufError(f"{self.path}: tensor {name} has ggml type {t.type[4:]}, which tpi-node does not know")
        return self._mm[t.offset : t.offset + t.nbytes]

    def remap(self) -> None:
        """Map the file afresh: the pages read through the old mapping leave this process's RSS
        (they stay in the page cache), once the views raw() handed out are released."""
        if self._mm is not None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")

    def close(self) -> None:
        """Drop this object's mapping; views handed out by raw() stay valid until released."""
        self._mm = None

    def __enter__(self) -> GgufFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GgufFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors)"


# ---------------------------------------------------------------------------------------------
# config.json from the metadata

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_REQUIRED = object()


def _meta(g: GgufFile, key: str, default=_REQUIRED):
    value = g.metadata.get(key, default)
    if value is _REQUIRED:
        raise GgufError(f"{g.path}: metadata key {key!r} is missing")
    return value


def _per_model(g: GgufFile, key: str, default=_REQUIRED) -> int:
    # Some files state a head count per layer; a model with uneven layers is not one we serve.
    value = _meta(g, key, default)
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise GgufError(f"{g.path}: {key} differs between layers ({value[:8]}...), which is not supported")
        value = value[0]
    return value


def _llama3_rope(g: GgufFile, theta: float, head_dim: int) -> dict:
    """llama.cpp stores Llama 3's rope scaling as per-frequency divisors (rope_freqs.weight), not
    as its parameters. Find the parameters that give exactly those divisors."""
    t = g.tensors["rope_freqs.weight"]
    if t.type != "F32":
        raise GgufError(f"{g.path}: rope_freqs.weight has type {t.type}; expected F32")
    stored = g.raw(t.name).view("<f4").astype(np.float64)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if stored.shape != inv.shape:
        raise GgufError(f"{g.path}: rope_freqs.weight has {stored.size} values; expected {inv.size}")
    wavelen = 2 * math.pi / inv
    factor = float(stored.max())
    for old_ctx in (8192, 4096, 16384, 2048, 32768, 131072):
        for lo, hi in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            medium = 1.0 / ((1 - smooth) / factor + smooth)
            want = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, medium))
            if np.allclose(stored, want, rtol=1e-4, atol=1e-6):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": lo,
                    "high_freq_factor": hi,
                    "original_max_position_embeddings": old_ctx,
                }
    raise GgufError(f"{g.path}: rope_freqs.weight matches no Llama 3 rope scaling; this rope is not supported")


def _rope_scaling(g: GgufFile, arch: str, theta: float, head_dim: int) -> dict | None:
    kind = _meta(g, f"{arch}.rope.scaling.type", None)
    factor = _meta(g, f"{arch}.rope.scaling.factor", None)
    if kind is None and _meta(g, f"{arch}.rope.scale_linear", None) is not None:  # older files
        kind, factor = "linear", _meta(g, f"{arch}.rope.scale_linear")
    if g.has("rope_freqs.weight"):
        return _llama3_rope(g, theta, head_dim)
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = _meta(g, f"{arch}.rope.scaling.original_context_length", None)
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    attn = _meta(g, f"{arch}.rope.scaling.attn_factor", None)
    if attn is not None:
        scaling["attention_factor"] = float(attn)
    return scaling


def hf_config(g: GgufFile) -> dict:
    """A Hugging Face config.json dict for a llama (Llama, Mistral, SmolLM...) or qwen2 GGUF."""
    arch = _meta(g, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise GgufError(f"{g.path}: architecture {arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)})")
    hidden = int(_meta(g, f"{arch}.embedding_length"))
    heads = int(_per_model(g, f"{arch}.attention.head_count"))
    kv_heads = int(_per_model(g, f"{arch}.attention.head_count_kv", heads))
    head_dim = _meta(g, f"{arch}.attention.key_length", None) or _meta(g, f"{arch}.rope.dimension_count", None)
    head_dim = int(head_dim or hidden // heads)
    theta = float(_meta(g, f"{arch}.rope.freq_base", 10000.0))
    vocab = _meta(g, f"{arch}.vocab_size", None) or len(_meta(g, "tokenizer.ggml.tokens", []))
    if not vocab and g.has("token_embd.weight"):
        vocab = g.tensors["token_embd.weight"].shape[0]
    if not vocab:
        raise GgufError(f"{g.path}: the vocabulary size is stated nowhere ({arch}.vocab_size, tokenizer.ggml.tokens)")
    cfg = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_per_model(g, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_meta(g, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": int(_meta(g, f"{arch}.context_length", 4096)),
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        "tie_word_embeddings": not g.has("output.weight"),
        "attention_bias": arch == "qwen2" or g.has("blk.0.attn_q.bias"),
        "torch_dtype": "float32",
    }
    # Both spellings, as transformers 5 writes them: rope_parameters (theta + scaling) and the
    # classic rope_theta / rope_scaling keys that older readers know.
    scaling = _rope_scaling(g, arch, theta, head_dim)
    cfg["rope_parameters"] = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
    if scaling:
        cfg["rope_scaling"] = scaling
    for key, meta_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _meta(g, f"tokenizer.ggml.{meta_key}", None)
        if value is not None:
            cfg[key] = int(value)
    return cfg


def end_of_generation_ids(g: GgufFile) -> list[int]:
    """Every token that ends a reply, as llama.cpp counts them: eos, plus eot / eom when stated
    (Llama 3 instruct ends its turns with <|eot_id|>)."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = _meta(g, f"tokenizer.ggml.{key}", None)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


# ---------------------------------------------------------------------------------------------
# tokenizer.json + tokenizer_config.json from the metadata

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Byte-level BPE: how text is split before the merges, by tokenizer.ggml.pre (llama.cpp's names).
# "digits": every digit on its own, then GPT-2's split (SmolLM, StarCoder: their tokenizer.json
# has a Digits pre-tokenizer before ByteLevel, as llama.cpp's split for these names does).
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the other 68 bytes take the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    extra = (b for b in range(256) if b not in kept)
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _merges(g: GgufFile) -> list[tuple[str, str]]:
    out = []
    for m in _meta(g, "tokenizer.ggml.merges"):
        parts = m.split(" ")
        if len(parts) != 2:
            raise GgufError(f"{g.path}: malformed tokenizer merge {m!r}")
        out.append((parts[0], parts[1]))
    return out


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """A SentencePiece BPE vocabulary lists no merges: every token that splits into two tokens is
    a merge, the best-scored merged token first (ties: shorter left part, then shorter right part),
    as transformers rebuilds them."""
    found = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(score, left, right) for left, right in pairs]
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: file order within ties
    return [(left, right) for _, left, right in found]


def _special_text(g: GgufFile, tokens: list[str], key: str) -> str | None:
    token_id = _meta(g, f"tokenizer.ggml.{key}", None)
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def build_tokenizer(g: GgufFile):
    """(tokenizers.Tokenizer, tokenizer_config dict) described by the GGUF's metadata.

    gpt2 (byte-level BPE) and llama (SentencePiece BPE with byte fallback) vocabularies; the
    result matches what transformers builds from the same file (AutoTokenizer with gguf_file=),
    except for tokenizer.ggml.pre names transformers does not know: those split as llama.cpp
    and the model's own tokenizer.json do (see _DIGITS_PRE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _meta(g, "tokenizer.ggml.model", None)
    tokens: list[str] = list(_meta(g, "tokenizer.ggml.tokens", []))
    if not tokens:
        raise GgufError(f"{g.path}: the GGUF carries no vocabulary (tokenizer.ggml.tokens)")
    types = list(_meta(g, "tokenizer.ggml.token_type", None) or [_NORMAL] * len(tokens))
    names = {
        name: _special_text(g, tokens, key)
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    specials = {t for t in names.values() if t is not None}

    if kind == "gpt2":
        pre = _meta(g, "tokenizer.ggml.pre", "default")
        byte_chars = _byte_alphabet()
        alphabet = set(byte_chars.values())
        # A token the file spells in plain text (not in the byte alphabet) is looked up by its bytes.
        spelled = [t if set(t) <= alphabet else "".join(byte_chars[b] for b in t.encode()) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        tk = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_merges(g),
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        if pre in _GPT2_PRE:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif pre in _DIGITS_PRE:
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        elif pre in _SPLITS:
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            known = sorted(_GPT2_PRE | _DIGITS_PRE | set(_SPLITS))
            raise GgufError(
                f"{g.path}: byte-level pre-tokenizer {pre!r} is not supported (supported: {', '.join(known)})"
            )
        tk.decoder = decoders.ByteLevel()
        add_bos_default = False
        # a control token outside the byte alphabet is a mislabel in the file (transformers skips it too)
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        scores = _meta(g, "tokenizer.ggml.scores", None)
        vocab = {t: i for i, t in enumerate(tokens)}
        if "tokenizer.ggml.merges" in g.metadata:
            merges = _merges(g)
        elif scores is not None:
            merges = _merges_from_scores(tokens, scores, vocab)
        else:
            raise GgufError(f"{g.path}: a SentencePiece vocabulary with neither merges nor scores")
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        prefix = bool(_meta(g, "tokenizer.ggml.add_space_prefix", True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tk.decoder = decoders.Sequence(steps)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    else:
        raise GgufError(
            f"{g.path}: tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)"
        )

    # Control tokens and the named ones (bos, eos, unk, pad) are special: matched whole in the
    # text, dropped by decode(skip_special_tokens=True). User-defined ones are matched whole too.
    special = list(dict.fromkeys([*control, *(t for t in tokens if t in specials)]))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab and t not in specials]
    if user:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    add_bos = bool(_meta(g, "tokenizer.ggml.add_bos_token", add_bos_default)) and names["bos_token"] is not None
    add_eos = bool(_meta(g, "tokenizer.ggml.add_eos_token", False)) and names["eos_token"] is not None
    single, pair, ids = "$A:0", "$A:0 $B:1", []
    if add_bos:
        bos = names["bos_token"]
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
        ids.append((bos, tk.token_to_id(bos)))
    if add_eos:
        eos = names["eos_token"]
        single = f"{single} {eos}:0"
        pair = pair.replace("$A:0", f"$A:0 {eos}:0") + f" {eos}:1"
        ids.append((eos, tk.token_to_id(eos)))
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)

    tok_config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in names.items() if v is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    template = _meta(g, "tokenizer.chat_template", None)
    named = {k.rsplit(".", 1)[1]: v for k, v in g.metadata.items() if k.startswith("tokenizer.chat_template.")}
    if named:  # several templates (tool use, rag...): the list form transformers writes
        default = [{"name": "default", "template": template}] if template else []
        tok_config["chat_template"] = default + [{"name": k, "template": v} for k, v in named.items()]
    elif template:
        tok_config["chat_template"] = template
    return tk, tok_config


def write_tokenizer(g: GgufFile, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json in `out`, as tpi_node/model/tokenizer.py (and
    transformers' AutoTokenizer) read them."""
    tk, tok_config = build_tokenizer(g)
    out = Path(out)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
