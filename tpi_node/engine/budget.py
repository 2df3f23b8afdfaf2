"""Memory budgets: choose the weight window W that fits a node's budget.

A node's memory while serving (all counted, nothing hidden):

    runtime      python + torch + grpc + the engine without weights (~265 MB RSS measured, torch 2.13)
    norms        every RMSNorm weight (always resident; tiny)
    window       W x its largest layer slice (the prefetcher's buffers, the one being loaded included)
    kv cache     2 (k, v) x layers x its KV heads x head_dim x tokens, x2 for the doubling growth
    activations  one step's hidden states, qkv, FFN intermediates and attention scores
    head         master only: embedding + lm_head (once when tied) and one step's logits

`choose_window` returns None (every layer resident) when all layers fit, else the largest W >= 2
that fits, else raises PlanError naming the smallest budget that would work. The step size it
assumes is the engine's own prefill chunk (engine/limits.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpi_node.dtypes import dtype_bytes
from tpi_node.engine.limits import DEFAULT_LIMITS
from tpi_node.model.config import ModelConfig
from tpi_node.units import format_size
from tpi_node.weights.plan import NodeShare, PlanError

RUNTIME_BYTES = 288 * 2**20  # a serving process without weights: ~230 MB after importing torch + grpc,
# ~265 MB with the engine, tokenizer and threads running (measured)
DEFAULT_KV_TOKENS = 4096  # tokens of KV cache a node reserves (all sequences together),
# capped at the model's context length
STEP_TOKENS = DEFAULT_LIMITS.prefill_chunk  # tokens of one prompt in one step
KV_GROWTH = 2  # KV buffers grow by doubling: capacity is at most 2x the length
MIN_WINDOW = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one node needs, by part; `total(W)` with W layers of its slice in memory."""

    layers: int
    layer_bytes: int
    runtime: int
    norms: int
    kv_cache: int
    activations: int
    head: int

    @property
    def fixed(self) -> int:
        return self.runtime + self.norms + self.kv_cache + self.activations + self.head

    def total(self, window: int | None) -> int:
        return self.fixed + (self.layers if window is None else window) * self.layer_bytes

    def largest_window(self, budget_bytes: int, who: str = "this node") -> int | None:
        """None when every layer fits (resident), else the largest W >= 2 that fits the budget."""
        if self.total(None) <= budget_bytes:
            return None
        w = (budget_bytes - self.fixed) // self.layer_bytes if self.layer_bytes else self.layers
        if w >= self.layers:
            return None
        if w < MIN_WINDOW:
            need = math.ceil(self.total(MIN_WINDOW) / 2**20)
            raise PlanError(
                f"memory budget {format_size(budget_bytes)} is too small for {who}: the smallest that "
                f"works is {need} MiB ({self.describe(MIN_WINDOW)}); raise --memory-budget or add nodes"
            )
        return int(w)

    def describe(self, window: int | None) -> str:
        w = self.layers if window is None else window
        return (
            f"window {w} x {format_size(self.layer_bytes)} + kv {format_size(self.kv_cache)} + "
            f"activations {format_size(self.activations)} + head {format_size(self.head)} + "
            f"runtime {format_size(self.runtime + self.norms)} = {format_size(self.total(window))}"
        )


def kv_cache_bytes(cfg: ModelConfig, share: NodeShare, tokens: int, dtype_bytes: int) -> int:
    # k and v, every layer, this node's KV heads only: [n_kv, capacity, hd] each
    return 2 * cfg.num_layers * share.n_kv * cfg.head_dim * tokens * dtype_bytes * KV_GROWTH


def activation_bytes(cfg: ModelConfig, share: NodeShare, step_tokens: int, context: int, dtype_bytes: int) -> int:
    """Peak live tensors of one layer's step on this node (a generous sum of the largest ones)."""
    T, H, hd = step_tokens, cfg.hidden_size, cfg.head_dim
    n_q = share.n_kv * cfg.q_per_kv
    hidden = 6 * T * H  # x, h, partials, residual sums, rope'd copies
    qkv = 2 * T * (n_q + 2 * share.n_kv) * hd  # projection + rope'd q/k
    ffn = 3 * T * share.n_ffn  # gate|up [T, 2F] + silu(gate)*up [T, F]
    scores = n_q * T * (context + T)  # attention scores of one prefill chunk
    rms = 2 * T * H  # rms_norm works in fp32
    return (hidden + qkv + ffn + scores) * dtype_bytes + rms * 4


def head_bytes(cfg: ModelConfig, dtype_bytes: int, step_tokens: int = 1) -> int:
    """Master only: embedding [V, H] (+ lm_head [V, H] unless tied) and fp32 logits [B, V]."""
    mats = 1 if cfg.tie_embeddings else 2
    return mats * cfg.vocab_size * cfg.hidden_size * dtype_bytes + 4 * step_tokens * cfg.vocab_size


def estimate(
    cfg: ModelConfig,
    share: NodeShare,
    dtype: str = "fp32",
    *,
    kv_tokens: int | None = None,
    step_tokens: int = STEP_TOKENS,
    is_master: bool = False,
    head: int | None = None,
    runtime: int = RUNTIME_BYTES,
) -> MemoryEstimate:
    """kv_tokens: tokens of KV cache to reserve; default min(DEFAULT_KV_TOKENS, context length)."""
    nbytes = dtype_bytes(dtype)
    if kv_tokens is None:
        kv_tokens = min(DEFAULT_KV_TOKENS, cfg.max_position)
    if is_master and head is None:
        head = head_bytes(cfg, nbytes)
    return MemoryEstimate(
        layers=cfg.num_layers,
        layer_bytes=share.layer_params(cfg) * nbytes,
        runtime=runtime,
        norms=(2 * cfg.num_layers + 1) * cfg.hidden_size * nbytes,
        kv_cache=kv_cache_bytes(cfg, share, kv_tokens, nbytes),
        activations=activation_bytes(cfg, share, min(step_tokens, kv_tokens), kv_tokens, nbytes),
        head=head if is_master else 0,
    )


def choose_window(
    cfg: ModelConfig,
    share: NodeShare,
    budget_bytes: int | None,
    dtype: str = "fp32",
    *,
    kv_tokens: int | None = None,
    step_tokens: int = STEP_TOKENS,
    is_master: bool = False,
    head: int | None = None,
    runtime: int = RUNTIME_BYTES,
) -> int | None:
    """The weight window for a node's memory budget: None when there is no budget or every layer
    fits, else the largest W >= 2 that fits; PlanError naming the smallest budget that works."""
    if budget_bytes is None:
        return None
    est = estimate(
        cfg, share, dtype, kv_tokens=kv_tokens, step_tokens=step_tokens, is_master=is_master, head=head, runtime=runtime
    )
    return est.largest_window(budget_bytes, "the master" if is_master else f"node {share.node_id}")
