"""The model math of one decoder layer, written over one node's slice of that layer.

A node holds a contiguous group of KV heads (with their query heads) and a contiguous block of
FFN columns. `attention_partial` and `mlp_partial` return that node's *partial* output
[T, hidden]; the sum over all nodes (done by a Collective, never here) is the layer's output.
With one node holding everything, the partial is the full output.

Shapes: T = tokens in the step (all sequences concatenated), H = hidden size, hd = head dim,
nq / nkv = query / KV heads held by this node, F = FFN columns held by this node.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tpi_node.model import decode_ops
from tpi_node.model.config import ModelConfig
from tpi_node.model.qkernel import best_of, qlinear
from tpi_node.model.quant import QMatrix


@dataclass
class LayerWeights:
    """One node's slice of one layer (see weights/slicer.py for how it is cut). A matrix is a float
    tensor, or a QMatrix of quantised blocks (model/quant.py) with the same [out, in] shape."""

    n_q: int  # query heads held here (0 -> no attention work)
    n_kv: int  # KV heads held here
    wqkv: torch.Tensor | None  # [(n_q + 2 n_kv) hd, H]  q, k, v stacked by rows
    bqkv: torch.Tensor | None  # [(n_q + 2 n_kv) hd]     Qwen2 / attention_bias only
    wo: torch.Tensor | None  # [H, n_q hd]             columns of o_proj
    w13: torch.Tensor | None  # [2F, H]                 gate rows then up rows
    w2: torch.Tensor | None  # [H, F]                  columns of down_proj

    def nbytes(self) -> int:
        ts = (self.wqkv, self.bqkv, self.wo, self.w13, self.w2)
        return sum(t.nbytes() if isinstance(t, QMatrix) else t.numel() * t.element_size() for t in ts if t is not None)

    def prepacked(self) -> LayerWeights:
        """The same slice with its matrices in oneDNN's layout (see `linear`)."""
        return LayerWeights(
            self.n_q, self.n_kv, prepack(self.wqkv), self.bqkv, prepack(self.wo), prepack(self.w13), prepack(self.w2)
        )


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """x @ w.T + b. A CPU weight prepacked by `prepack` (oneDNN's blocked layout) runs through
    oneDNN, 1.7x faster than the MKL path for one-token decode and 2.6x for 8 rows on an AMD EPYC
    VM (scripts/bench_single.py), slower on an Intel Xeon one: `prepack_pays` measures which. A
    QMatrix runs the quantised matmul (model/qkernel.py), its small steps on `threads` of the
    kernel's pool (default: as many as `tune` chose)."""
    if isinstance(w, QMatrix):
        return qlinear(x, w, b, threads)
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and os.environ.get("TPI_PREPACK", "auto") != "0"
    )


PREPACK_SAMPLE_ROWS = 8192  # rows of a matrix that prepack_pays times (bounded time and memory)
_PREPACK_PAYS: dict[tuple, bool] = {}  # (dtype, rows timed, columns) -> measured once per process


def prepack_pays(w: torch.Tensor) -> bool:
    """Whether oneDNN's prepacked layout (`linear`) beats the plain matrix here per decoded token
    (steps of 1 and 8 rows, one thread), timed on up to PREPACK_SAMPLE_ROWS rows of `w` in ~0.1 s,
    once per shape. It won 1.7x on an AMD EPYC and lost on an Intel Xeon with AMX (one row
    of a 128k x 2048 fp32 lm_head: 105 ms prepacked, 74 ms plain), so it is measured where the
    node starts; the line it says tells the outcome."""
    if os.environ.get("TPI_PREPACK", "auto") == "1":  # forced (TPI_PREPACK=0 turns it off: can_prepack)
        return True
    sample = w[:PREPACK_SAMPLE_ROWS]
    key = (w.dtype, *sample.shape)
    if key not in _PREPACK_PAYS:
        packed, threads = prepack(sample.contiguous()), torch.get_num_threads()
        x1, x8 = (torch.randn(n, w.shape[1], dtype=w.dtype) for n in (1, 8))
        torch.set_num_threads(1)
        try:
            t = best_of(
                {
                    "plain 1": lambda: F.linear(x1, sample),
                    "prepacked 1": lambda: linear(x1, packed),
                    "plain 8": lambda: F.linear(x8, sample),
                    "prepacked 8": lambda: linear(x8, packed),
                },
                rounds=3,
            )
        finally:
            torch.set_num_threads(threads)
        # per token: one sequence decoding, and eight decoding in one step, weighed alike
        pays = t["prepacked 1"] + t["prepacked 8"] / 8 < t["plain 1"] + t["plain 8"] / 8
        _PREPACK_PAYS[key] = pays
        us = lambda n: f"{t[f'prepacked {n}'] * 1e6:.0f}/{t[f'plain {n}'] * 1e6:.0f} us"  # noqa: E731
        print(
            f"[tpi-node] oneDNN prepacked weights ({key[1]}x{key[2]} {str(w.dtype)[6:]}, prepacked/plain: "
            f"1 row {us(1)}, 8 rows {us(8)}): {'used' if pays else 'not used, slower here'}",
            file=sys.stderr,
            flush=True,
        )
    return _PREPACK_PAYS[key]


def prepack(w: torch.Tensor | None) -> torch.Tensor | None:
    """A [out, in] CPU weight reordered once for oneDNN (a copy; the original can be freed).
    A QMatrix is returned as it is (its kernel reads the blocks)."""
    if w is None or isinstance(w, QMatrix):
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H]. Computed in fp32 as Hugging Face does, cast back, then scaled."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = residual + delta and rms_norm(x): [T, H] each; one C call in fp32 on the CPU."""
    delta = delta.to(residual.dtype)
    if decode_ops.usable(residual, delta, weight):
        return decode_ops.add_rms_norm(residual, delta, weight, eps)
    x = residual + delta
    return x, rms_norm(x, weight, eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[hd/2] inverse frequencies, with Llama-3 or linear rope scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = cfg.rope_scaling_dict
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type '{kind}' is not supported")
    return inv


class Rope:
    """cos/sin tables [positions, hd], grown on demand (fp32, as Hugging Face computes them)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self.cos = self.sin = torch.empty(0, cfg.head_dim, device=device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1
        if need > self.cos.shape[0]:
            n = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, device=self.inv_freq.device).float(), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos/sin: [T, hd]. Rotate-half convention (Hugging Face layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention_partial(h, w: LayerWeights, cache, layout, rope_cs, head_dim: int) -> torch.Tensor:
    """h: [T, H] normed hidden states of every token in the step -> partial [T, H].

    `cache` (engine/kv_cache.py LayerKV, indexed for this step) stores this layer's new keys and
    values and hands back what each sequence attends to. `rope_cs` = (cos, sin) [T, hd].
    Each sequence attends only to its own cache; prompts arrive in bounded chunks (the engine's
    prefill chunk), so no prompt-length-squared matrix is ever built.
    """
    T = h.shape[0]
    if w.n_q == 0:
        return h.new_zeros(T, h.shape[1])
    cos, sin = rope_cs
    if len(cache.index.decode) == T and decode_ops.fused_half(h, w.wqkv, w.wo) and decode_ops.usable(cos, sin, cache.k):
        return decode_ops.attention_decode(h, w, cache, cos, sin, head_dim)  # the whole half, one call
    qkv = linear(h, w.wqkv, w.bqkv)  # [T, (nq + 2nkv) hd]
    nq, nkv = w.n_q * head_dim, w.n_kv * head_dim
    fast = decode_ops.usable(qkv, cos, sin, cache.k)  # fp32 on the CPU: rope, store, decode attention in C
    if fast:
        decode_ops.rope_store(qkv, w.n_q, w.n_kv, head_dim, cos, sin, cache)  # q and k roped in place
        q = qkv[:, :nq].view(T, w.n_q, head_dim)
    else:
        q = qkv[:, :nq].view(T, w.n_q, head_dim)
        k = qkv[:, nq : nq + nkv].view(T, w.n_kv, head_dim)
        v = qkv[:, nq + nkv :].view(T, w.n_kv, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.store(k, v)  # every new token of every sequence, one write

    g = w.n_q // w.n_kv  # query heads per KV head
    out = torch.empty(T, w.n_q, head_dim, dtype=h.dtype, device=h.device)
    decode, rows = cache.index.decode, cache.index.decode_rows  # the one-token sequences, their rows
    if decode and fast:
        decode_ops.attend_decode(qkv, rows, w.n_q, w.n_kv, head_dim, cache, out.view(T, nq))
    elif decode:
        # every one-token sequence in ONE call: the g query heads of a KV head become g rows
        # against that head's keys (no GQA expansion); the mask hides each slot's unused tail
        ks, vs, mask = cache.decode_kv()  # [B, nkv, L, hd], [B, 1, 1, L]
        qs = q[rows].view(len(decode), w.n_kv, g, head_dim)  # [B, nkv, g, hd]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)  # [B, nkv, g, hd]
        out[rows] = o.reshape(len(decode), w.n_q, head_dim)
    starts = [0, *itertools.accumulate(layout.new_lens)] if len(decode) < len(layout.new_lens) else ()
    for j, n in enumerate(layout.new_lens):
        if n == 1:
            continue
        start, past = starts[j], layout.past_lens[j]
        ks, vs = cache.sequence_kv(j)  # [nkv, past+n, hd]
        qs = q[start : start + n].transpose(0, 1)[None]  # [1, nq, n, hd]
        if g > 1:
            ks, vs = ks.repeat_interleave(g, dim=0), vs.repeat_interleave(g, dim=0)
        ks, vs = ks[None], vs[None]
        if past == 0:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:  # a later prefill chunk: token i sees the whole past and new tokens <= i
            mask = torch.ones(n, past + n, dtype=torch.bool, device=h.device).tril(past)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        out[start : start + n] = o[0].transpose(0, 1)
    return linear(out.view(T, nq), w.wo)  # [T, H]


def mlp_partial(h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    """SwiGLU over this node's FFN columns. h: [T, H] -> partial [T, H]."""
    if w.w13 is None:
        return torch.zeros_like(h)
    if decode_ops.fused_half(h, w.w13, w.w2):  # quantised, small, fp32 on the CPU: one call
        return decode_ops.mlp(h, w)
    gate, up = linear(h, w.w13).chunk(2, dim=-1)  # [T, F] each
    return linear(F.silu(gate) * up, w.w2)
