"""The C decode ops (model/decode_ops.c) against the torch ops they replace on fp32 CPU nodes
(those torch ops are what tests/test_model_vs_hf.py holds to transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.kv_cache import PagedKVCache
from tpi_node.model import decode_ops
from tpi_node.model.layers import apply_rope, rms_norm

pytestmark = pytest.mark.skipif(not decode_ops.usable(torch.zeros(1)), reason="no C compiler: torch ops run")


def test_add_rms_norm_equals_the_torch_ops():
    res, delta, w = torch.randn(5, 576), torch.randn(5, 576), torch.rand(576) + 0.5
    x, h = decode_ops.add_rms_norm(res, delta, w, 1e-5)
    assert torch.equal(x, res + delta)
    assert torch.allclose(h, rms_norm(res + delta, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_q, n_kv", [(9, 3), (4, 4), (2, 1)])
def test_rope_store_and_decode_attention_equal_the_torch_ops(n_q, n_kv):
    """A mixed step: sequence 0 prefills 5 tokens after 20, sequences 1-3 decode one token after
    0, 37 and 70 (blocks scattered over the pool): rope and the KV write for every token, and the
    decode rows' attention, against apply_rope + index writes + scaled_dot_product_attention."""
    hd, g = 64, n_q // n_kv
    past, new = (20, 0, 37, 70), (5, 1, 1, 1)
    blocks = [list(range(k * 7 % 40, k * 7 % 40 + 6)) for k in range(4)]  # disjoint 6-block tables
    blocks = [[b + 40 * k for b in t] for k, t in enumerate(blocks)]
    layout = BatchLayout((1, 2, 3, 4), past, new, tuple(tuple(t) for t in blocks))
    T = sum(new)
    kv = PagedKVCache(1, n_kv, hd, torch.float32, "cpu", 200)
    for pool in (kv.k[0], kv.v[0]):
        pool[: kv.null_slot].copy_(torch.randn(kv.null_slot, n_kv, hd))
    want_k, want_v = kv.k[0].clone(), kv.v[0].clone()
    kv.begin(layout)
    cache = kv.layer(0)
    qkv = torch.randn(T, (n_q + 2 * n_kv) * hd)
    pos = layout.positions()
    emb = torch.randn(128, hd)
    cos, sin = emb.cos()[pos].contiguous(), emb.sin()[pos].contiguous()

    q = apply_rope(qkv[:, : n_q * hd].view(T, n_q, hd), cos, sin)
    k = apply_rope(qkv[:, n_q * hd : (n_q + n_kv) * hd].view(T, n_kv, hd), cos, sin)
    v = qkv[:, (n_q + n_kv) * hd :].view(T, n_kv, hd)
    want_k[kv.index.slots], want_v[kv.index.slots] = k, v

    fused = qkv.clone()
    decode_ops.rope_store(fused, n_q, n_kv, hd, cos, sin, cache)
    assert torch.allclose(fused[:, : n_q * hd].view(T, n_q, hd), q, atol=1e-6)
    assert torch.allclose(kv.k[0], want_k, atol=1e-6) and torch.equal(kv.v[0], want_v)

    rows = kv.index.decode_rows  # the decode sequences' tokens in the step
    assert rows.tolist() == [5, 6, 7]
    out = torch.full((T, n_q * hd), 7.0)
    decode_ops.attend_decode(fused, rows, n_q, n_kv, hd, cache, out)
    ks, vs, mask = cache.decode_kv()  # [B, nkv, L, hd]
    qs = q[rows].view(3, n_kv, g, hd)
    want = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).reshape(3, n_q * hd)
    assert torch.allclose(out[rows], want, atol=1e-5)
    assert torch.equal(out[:5], torch.full((5, n_q * hd), 7.0))  # the prefill rows are not its to write
    assert kv.index.decode_lens.tolist() == [1, 38, 71]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("past", [(1499, 0, 300, 17), (1499,)])
@pytest.mark.parametrize("n_q, n_kv, hd", [(9, 3, 64), (4, 1, 128), (2, 2, 40)])
def test_decode_attention_over_long_contexts_on_the_pools_threads(monkeypatch, threads, past, n_q, n_kv, hd):
    """Contexts of 1 to 1,500 keys, scores far apart (the online softmax rescales as its max
    grows), one sequence whose keys are cut into chunks on two threads and merged, a head dim
    that is no multiple of 16 (the tiles' masked tails): scaled_dot_product_attention's numbers."""
    from tpi_node.model import qkernel

    monkeypatch.setattr(qkernel.TUNING, "decode_threads", threads)
    B = len(past)
    blocks = [list(range(k * 100, k * 100 + 94)) for k in range(B)]  # 94 blocks of 16 slots each
    layout = BatchLayout(tuple(range(1, B + 1)), past, (1,) * B, tuple(tuple(t) for t in blocks))
    kv = PagedKVCache(1, n_kv, hd, torch.float32, "cpu", 400)
    g = torch.Generator().manual_seed(1)
    for pool in (kv.k[0], kv.v[0]):
        pool[: kv.null_slot].copy_(torch.randn(kv.null_slot, n_kv, hd, generator=g) * 3)
    kv.begin(layout)
    cache = kv.layer(0)
    qkv = torch.randn(B, (n_q + 2 * n_kv) * hd, generator=g) * 3
    cache.store(qkv[:, n_q * hd : (n_q + n_kv) * hd].view(B, n_kv, hd), qkv[:, (n_q + n_kv) * hd :].view(B, n_kv, hd))
    rows = kv.index.decode_rows
    out = torch.empty(B, n_q * hd)
    decode_ops.attend_decode(qkv, rows, n_q, n_kv, hd, cache, out)
    ks, vs, mask = cache.decode_kv()  # [B, nkv, L, hd]
    qs = qkv[:, : n_q * hd].view(B, n_kv, n_q // n_kv, hd)
    want = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).reshape(B, n_q * hd)
    assert kv.index.decode_lens.tolist() == [p + 1 for p in past]
    assert torch.allclose(out, want, rtol=1e-4, atol=5e-5), (out - want).abs().max()  # values ~3: fp32 sums


@pytest.mark.parametrize("act", ["none", "int8"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_halves_equal_the_unfused_path(monkeypatch, act, bias):
    """A decode step over quantised matrices runs each half of the layer as one call
    (decode_ops.attention_decode, decode_ops.mlp): the same numbers as the step-by-step path
    (its kernels and ops), with a Qwen2-style qkv bias too and under --act-quant int8."""
    from tpi_node.model import qkernel
    from tpi_node.model.layers import LayerWeights, attention_partial, mlp_partial
    from tpi_node.model.quant import quantize

    n_q, n_kv, hd, hidden, ffn = 9, 3, 64, 576, 320
    g = torch.Generator().manual_seed(0)
    mat = lambda n, k, fmt="q4_1": quantize(torch.randn(n, k, generator=g) * 0.05, fmt)  # noqa: E731
    w = LayerWeights(
        n_q,
        n_kv,
        mat((n_q + 2 * n_kv) * hd, hidden),
        torch.randn((n_q + 2 * n_kv) * hd, generator=g) if bias else None,
        mat(hidden, n_q * hd, "q8_0"),
        mat(2 * ffn, hidden),
        mat(hidden, ffn),
    )
    layout = BatchLayout((1, 2), (20, 5), (1, 1), ((0, 1), (2,)))
    h = torch.randn(2, hidden, generator=g)
    emb = torch.randn(64, hd, generator=g)
    pos = layout.positions()
    rope = (emb.cos()[pos].contiguous(), emb.sin()[pos].contiguous())
    pools = torch.randn(2, 8 * 16 + 1, n_kv, hd, generator=g)
    qkernel.use_act_quant(act)
    if act == "int8" and not qkernel.TUNING.int8_activations:
        pytest.skip("no AVX512-VNNI here: --act-quant int8 runs the exact kernel")
    monkeypatch.setattr(qkernel.TUNING, "kernel_max_tokens", 16)  # the kernel's step sizes (what tune sets)
    assert decode_ops.fused_half(h, w.wqkv, w.wo) and decode_ops.fused_half(h, w.w13, w.w2)

    def layer():
        kv = PagedKVCache(1, n_kv, hd, torch.float32, "cpu", 8)
        kv.k[0].copy_(pools[0]), kv.v[0].copy_(pools[1])
        kv.begin(layout)
        return attention_partial(h, w, kv.layer(0), layout, rope, hd), mlp_partial(h, w), kv.k[0].clone()

    fused = layer()
    monkeypatch.setattr(decode_ops, "fused_half", lambda *a: False)
    plain = layer()
    assert torch.allclose(fused[0], plain[0], rtol=0, atol=1e-6)  # the same kernels and ops in C
    assert torch.allclose(fused[1], plain[1], rtol=0, atol=1e-5)  # silu: expf against torch's
    assert torch.equal(fused[2], plain[2])  # the same keys written
