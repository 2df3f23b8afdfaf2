"""The small ops of a decode step as single calls into decode_ops.c (built with the quantised
kernel, model/qkernel.py), where every tensor is fp32 on the CPU; elsewhere (bf16/fp16, CUDA, MPS,
no C compiler) model/layers.py runs the same math in torch ops.

Why: at SmolLM2's size a one-token step spent ~8 ms of ~17 in the dispatch of ~50 small torch ops
a layer (rope, the KV write, attention, add + RMSNorm), as long as in its matmuls. The C versions
compute the same fp32 arithmetic in a different summation order: tests hold them to transformers
at the usual fp32 tolerance, like the torch path. Where the layer's matrices are quantised and
every sequence of the step decodes, each half of the layer (`attention_decode`, `mlp`) is one call.
"""

from __future__ import annotations

import ctypes

import torch

from tpi_node.model.qkernel import REDUCE_FN, TUNING, library
from tpi_node.model.quant import KIND, QMatrix


def usable(*tensors: torch.Tensor) -> bool:
    """All fp32, contiguous, on the CPU, and the library is built."""
    for t in tensors:  # a plain loop: asked several times a layer
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return library() is not None


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = residual + delta, h = weight * x / rms(x); [T, H] each (fp32 CPU, see `usable`)."""
    x, h = torch.empty_like(residual), torch.empty_like(residual)
    t, n = residual.shape
    library().tpi_add_rmsnorm(
        residual.data_ptr(), delta.data_ptr(), weight.data_ptr(), t, n, eps, x.data_ptr(), h.data_ptr()
    )
    return x, h


def rope_store(qkv: torch.Tensor, n_q: int, n_kv: int, head_dim: int, cos, sin, kv) -> None:
    """qkv [T, (n_q + 2 n_kv) hd]: rope on its q and k heads in place, then k and v written to the
    cache `kv` (engine/kv_cache.py LayerKV) at the step's slots. cos / sin [T, hd]."""
    library().tpi_rope_store(
        qkv.data_ptr(),
        qkv.shape[0],
        n_q,
        n_kv,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        kv.k.data_ptr(),
        kv.v.data_ptr(),
        kv.index.slots.data_ptr(),
    )


def attend_decode(qkv: torch.Tensor, rows: torch.Tensor, n_q: int, n_kv: int, head_dim: int, kv, out) -> None:
    """Attention of the step's one-token sequences: sequence b's query is row rows[b] of qkv (its
    first n_q heads), its keys and values the cache's decode slots (StepIndex); the result goes to
    row rows[b] of out [T, n_q hd]. Softmax scale 1/sqrt(hd), as scaled_dot_product_attention's.
    Long contexts run on the kernel pool's decode threads (their keys cut into chunks)."""
    idx = kv.index
    slots, lens = idx.decode_slots, idx.decode_lens
    rc = library().tpi_attend_decode(
        qkv.data_ptr(),
        qkv.shape[1],
        rows.data_ptr(),
        rows.shape[0],
        n_q,
        n_kv,
        head_dim,
        kv.k.data_ptr(),
        kv.v.data_ptr(),
        slots.data_ptr(),
        slots.shape[1],
        lens.data_ptr(),
        head_dim**-0.5,
        TUNING.decode_threads,
        out.data_ptr(),
        out.shape[1],
    )
    if rc != 0:
        raise MemoryError(f"the attention of {rows.shape[0]} decoding sequences failed (scratch memory)")


def _blocks(*ws) -> bool:
    return all(isinstance(w, QMatrix) and w.data.is_contiguous() for w in ws)


def fused_half(h: torch.Tensor, *ws) -> bool:
    """Whether a layer half over matrices `ws` runs as one call: fp32 on the CPU, every matrix in
    contiguous blocks, and a step small enough for the kernel (qkernel.qlinear's rule)."""
    return h.shape[0] <= TUNING.kernel_max_tokens and _blocks(*ws) and usable(h)


def attention_decode(h: torch.Tensor, w, kv, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """attention_partial of a step whose every sequence decodes one token (token t is sequence t),
    as one call: h [T, H] -> this node's partial [T, H]. `w`: model/layers.py LayerWeights."""
    idx = kv.index
    t, n = h.shape
    out = torch.empty(t, n)
    bias = w.bqkv.float().contiguous() if w.bqkv is not None else None
    rc = library().tpi_attention_decode(
        h.data_ptr(),
        t,
        n,
        KIND[w.wqkv.fmt],
        w.wqkv.data.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        KIND[w.wo.fmt],
        w.wo.data.data_ptr(),
        w.n_q,
        w.n_kv,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        kv.k.data_ptr(),
        kv.v.data_ptr(),
        idx.slots.data_ptr(),
        idx.decode_slots.data_ptr(),
        idx.decode_slots.shape[1],
        idx.decode_lens.data_ptr(),
        head_dim**-0.5,
        TUNING.decode_threads,
        int(TUNING.int8_activations),
        out.data_ptr(),
    )
    if rc != 0:
        raise MemoryError(f"the fused attention of a {t}-token step failed (scratch memory)")
    return out


def mlp(h: torch.Tensor, w) -> torch.Tensor:
    """mlp_partial as one call: h [T, H] -> this node's partial [T, H] (SwiGLU over its columns)."""
    t, n = h.shape
    out = torch.empty(t, n)
    rc = library().tpi_mlp(
        h.data_ptr(),
        t,
        n,
        KIND[w.w13.fmt],
        w.w13.data.data_ptr(),
        KIND[w.w2.fmt],
        w.w2.data.data_ptr(),
        w.w2.shape[1],
        TUNING.decode_threads,
        int(TUNING.int8_activations),
        out.data_ptr(),
    )
    if rc != 0:
        raise MemoryError(f"the fused FFN of a {t}-token step failed (scratch memory)")
    return out


class DecodeStack:
    """Every layer of a node that holds them all, for `tpi_decode_layers`: per layer the addresses of
    its matrices, bias, KV pools and norms, gathered once (the layers and pools stay where they are
    for the node's life). `of` says None where a layer does not fit the fused halves."""

    def __init__(self, layers: list, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor], post, nxt) -> None:
        w0 = layers[0]
        self.n_q, self.n_kv, self.ffn = w0.n_q, w0.n_kv, w0.w2.shape[1]
        biases = [w.bqkv.float().contiguous() if w.bqkv is not None else None for w in layers]  # fp32 copies
        self._held = (layers, biases, kv_k, kv_v, post, nxt)  # what the addresses point into stays alive
        cols = {
            "wqkv": [w.wqkv.data.data_ptr() for w in layers],
            "kqkv": [KIND[w.wqkv.fmt] for w in layers],
            "bqkv": [b.data_ptr() if b is not None else 0 for b in biases],
            "wo": [w.wo.data.data_ptr() for w in layers],
            "ko": [KIND[w.wo.fmt] for w in layers],
            "w13": [w.w13.data.data_ptr() for w in layers],
            "k13": [KIND[w.w13.fmt] for w in layers],
            "w2": [w.w2.data.data_ptr() for w in layers],
            "k2": [KIND[w.w2.fmt] for w in layers],
            "kpool": [t.data_ptr() for t in kv_k],
            "vpool": [t.data_ptr() for t in kv_v],
            "post": [t.data_ptr() for t in post],
            "next": [t.data_ptr() for t in nxt],
        }
        kinds = ("kqkv", "ko", "k13", "k2")
        self.arrays = {k: torch.tensor(v, dtype=torch.int32 if k in kinds else torch.int64) for k, v in cols.items()}

    @classmethod
    def of(cls, layers: list, kv_k, kv_v, post, nxt) -> DecodeStack | None:
        """The stack, or None: every layer's matrices quantised in contiguous blocks, attention and
        FFN work on each, one shape for all, and fp32 CPU pools and norms."""
        w0 = layers[0]
        for w in layers:
            if not (_blocks(w.wqkv, w.wo, w.w13, w.w2) and w.n_q > 0):
                return None
            if (w.n_q, w.n_kv, w.w2.shape[1]) != (w0.n_q, w0.n_kv, w0.w2.shape[1]):
                return None
        if not usable(*kv_k, *kv_v, *post, *nxt):
            return None
        return cls(layers, kv_k, kv_v, post, nxt)

    def run(self, x: torch.Tensor, h: torch.Tensor, index, cos, sin, head_dim: int, eps: float, reduce=None) -> None:
        """The whole layer loop of a decode step (every sequence decodes: token t is sequence t) on
        x (the residual) and h (its input-normed copy), [T, H] each, in place: afterwards x is the
        last layer's residual and h its final-normed hidden states. `reduce`: on a node of a
        cluster, partial [T, H] -> the sum over the nodes (the collective's allreduce), called
        after each half layer; what it raises is raised here."""
        a = self.arrays
        t, n = h.shape
        failed: list[BaseException] = []
        scratch: list[torch.Tensor] = []  # the C call's one partial buffer as [T, H], wrapped once per call

        def _reduce(address: int, values: int) -> int:
            try:
                if not scratch or scratch[0].data_ptr() != address:  # (wrapping costs ~3 us; 60 calls a token)
                    buf = (ctypes.c_float * values).from_address(address)
                    scratch[:] = [torch.frombuffer(buf, dtype=torch.float32).view(t, n)]
                scratch[0].copy_(reduce(scratch[0]))
                return 0
            except BaseException as e:  # (it cannot cross the C frames: raised below)
                failed.append(e)
                return -3

        callback = REDUCE_FN(_reduce) if reduce is not None else REDUCE_FN()  # (a NULL one: alone)
        rc = library().tpi_decode_layers(
            len(a["wqkv"]),
            *(a[k].data_ptr() for k in ("wqkv", "kqkv", "bqkv", "wo", "ko", "w13", "k13", "w2", "k2")),
            *(a[k].data_ptr() for k in ("kpool", "vpool", "post", "next")),
            t,
            n,
            self.n_q,
            self.n_kv,
            head_dim,
            self.ffn,
            cos.data_ptr(),
            sin.data_ptr(),
            index.slots.data_ptr(),
            index.decode_slots.data_ptr(),
            index.decode_slots.shape[1],
            index.decode_lens.data_ptr(),
            head_dim**-0.5,
            eps,
            TUNING.decode_threads,
            int(TUNING.int8_activations),
            x.data_ptr(),
            h.data_ptr(),
            callback,
        )
        if failed:
            raise failed[0]
        if rc != 0:
            raise MemoryError(f"the fused layers of a {t}-token step failed (scratch memory)")
