#!/usr/bin/env python3
"""Carry a model to the GPU machine under the tool's 64 MiB limit: pack a model directory to
3-bit weights (every 2-D matrix, the tied embedding / lm_head too), unpack it there into an
fp32 Hugging Face directory.

SmolLM2-135M (the default model) is 538 MB in fp32 and 98 MB as its Q4_1 GGUF: neither travels.
Round-to-nearest with one fp16 scale and minimum per group of 256 weights gives ~50 MiB, which
leaves room for the wheels the gRPC path needs there (grpcio, protobuf, zeroconf). The
unpacked model is NOT the default model's weights (it is a 3/4-bit rounding of them): the device
check compares the CUDA runs with a CPU run of the SAME unpacked weights, on the default model's
architecture and tokenizer.

    python3 scripts/device_pack_model.py pack ~/.cache/tpi-node/models/smollm2-135m-instruct .devcarry/smollm2
    python3 scripts/device_pack_model.py unpack .devcarry/smollm2 /tmp/smollm2-q3
"""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np

GROUP = 256  # weights per (scale, minimum) pair
BITS = 3
EMBED = "model.embed_tokens.weight"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja")


def _bits(name: str) -> int:
    return BITS


def quantize(w: np.ndarray, bits: int, group: int = GROUP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [R, C] fp32, R*C % group == 0 -> (codes uint8 [R*C/group, group], scale fp16 [.., 1], min fp16 [.., 1])."""
    g = w.reshape(-1, group)
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    lo16 = lo.astype(np.float16)
    scale16 = ((hi - lo16.astype(np.float32)) / (2**bits - 1)).astype(np.float16)
    scale = np.where(scale16 == 0, 1, scale16).astype(np.float32)
    q = np.clip(np.rint((g - lo16.astype(np.float32)) / scale), 0, 2**bits - 1).astype(np.uint8)
    return q, scale16, lo16


def dequantize(q: np.ndarray, scale16: np.ndarray, lo16: np.ndarray, shape) -> np.ndarray:
    return (q.astype(np.float32) * scale16.astype(np.float32) + lo16.astype(np.float32)).reshape(shape)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    flat = q.reshape(-1)
    if bits == 4:
        return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    v = flat.reshape(-1, 8).astype(np.uint32)  # 8 codes of 3 bits -> 3 bytes
    word = sum(v[:, i] << (3 * i) for i in range(8))
    return np.stack([(word >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8).reshape(-1)


def unpack_bits(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 4:
        out = np.empty(n, dtype=np.uint8)
        out[0::2], out[1::2] = b & 0xF, b >> 4
        return out
    t = b.reshape(-1, 3).astype(np.uint32)
    word = t[:, 0] | (t[:, 1] << 8) | (t[:, 2] << 16)
    return np.stack([(word >> (3 * i)) & 7 for i in range(8)], 1).astype(np.uint8).reshape(-1)


def pack(model_dir: Path, out: Path) -> None:
    from safetensors.numpy import load_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(model_dir / "model.safetensors"))
    meta, blobs, at = {}, [], 0
    for name, w in sorted(tensors.items()):
        w = w.astype(np.float32)
        if w.ndim == 2 and w.size % GROUP == 0:  # groups run along the flattened rows
            bits = _bits(name)
            q, s, m = quantize(w, bits)
            parts = [pack_bits(q, bits), s.view(np.uint8).reshape(-1), m.view(np.uint8).reshape(-1)]
            meta[name] = {
                "shape": list(w.shape),
                "bits": bits,
                "group": GROUP,
                "sizes": [p.size for p in parts],
                "at": at,
            }
        else:  # norms: kept as fp32
            parts = [w.view(np.uint8).reshape(-1)]
            meta[name] = {"shape": list(w.shape), "bits": 32, "sizes": [parts[0].size], "at": at}
        blobs += parts
        at += sum(p.size for p in parts)
    np.concatenate(blobs).tofile(out / "weights.bin")
    (out / "weights.json").write_text(json.dumps(meta))
    (out / "tokenizer.json.xz").write_bytes(lzma.compress((model_dir / "tokenizer.json").read_bytes(), preset=9))
    for f in SIDE_FILES:
        if (model_dir / f).is_file():
            shutil.copy(model_dir / f, out / f)
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"packed {len(meta)} tensors into {out}: {total / 2**20:.1f} MiB", flush=True)


def unpack(packed: Path, out: Path) -> Path:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    raw = np.fromfile(packed / "weights.bin", dtype=np.uint8)
    tensors = {}
    for name, m in json.loads((packed / "weights.json").read_text()).items():
        at, shape = m["at"], tuple(m["shape"])
        parts, off = [], at
        for size in m["sizes"]:
            parts.append(raw[off : off + size])
            off += size
        if m["bits"] == 32:
            tensors[name] = parts[0].view(np.float32).reshape(shape).copy()
            continue
        n = int(np.prod(shape))
        q = unpack_bits(parts[0], m["bits"], n).reshape(-1, m.get("group", 128))  # packs before v2: 128
        s, lo = parts[1].view(np.float16).reshape(-1, 1), parts[2].view(np.float16).reshape(-1, 1)
        tensors[name] = dequantize(q, s, lo, shape)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_bytes(lzma.decompress((packed / "tokenizer.json.xz").read_bytes()))
    for f in SIDE_FILES:
        if (packed / f).is_file():
            shutil.copy(packed / f, out / f)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        raise SystemExit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(Path(sys.argv[2]).expanduser(), Path(sys.argv[3]).expanduser())
