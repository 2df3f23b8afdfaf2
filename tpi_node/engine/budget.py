"""Memory budgets: what a node holds while serving, and how its --memory-budget is split.

A node's memory (all counted, nothing hidden):

    runtime      python + torch + grpc + the engine without weights (~265 MB RSS measured, torch 2.13)
    norms        every RMSNorm weight (always resident; tiny)
    window       W x its largest layer slice (the prefetcher's buffers, the one being loaded included)
    activations  one step at the engine's limits (engine/limits.py): max_step_tokens rows through
                 the projections, one prefill chunk's attention scores against the longest context
    head         master only: embedding + lm_head (once when tied) and the logits of a full batch
    kv pool      its paged KV cache: blocks x 2 (k, v) x layers x its KV heads x BLOCK_TOKENS x
                 head_dim, plus one layer's worth for the gather a decode step makes

The budget is given out in that order: everything but the KV pool first, the weights resident
when they fit next to the smallest useful pool (MIN_KV_TOKENS), else streamed through the largest
window W >= 2 that does; whatever is left becomes KV blocks. `plan_memory` does the split for one
node; a PlanError names the smallest budget that would work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tpi_node.dtypes import dtype_bytes
from tpi_node.engine.limits import BLOCK_TOKENS, DEFAULT_LIMITS, EngineLimits
from tpi_node.model.config import ModelConfig
from tpi_node.units import format_size
from tpi_node.weights.plan import NodeShare, PlanError
from tpi_node.weights.sizes import WeightBytes, float_bytes

RUNTIME_BYTES = 288 * 2**20  # a serving process without weights: ~230 MB after importing torch + grpc,
# ~265 MB with the engine, tokenizer and threads running (measured)
MIN_KV_TOKENS = 2 * DEFAULT_LIMITS.prefill_chunk  # the least KV cache a node is planned with
UNBUDGETED_KV_TOKENS = 16384  # without --memory-budget: the KV pool's tokens, at most
MIN_WINDOW = 2


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one node needs, by part; `total(W, blocks)` with W layers of its slice in memory."""

    layers: int
    layer_bytes: int
    runtime: int
    norms: int
    activations: int
    head: int
    block_bytes: int  # one KV block of this node's heads, every layer, keys and values
    min_blocks: int  # the pool it is planned with at least

    def kv_bytes(self, blocks: int) -> int:
        """The pool, and the gather of one layer's keys and values a decode step makes."""
        return blocks * self.block_bytes + math.ceil(blocks * self.block_bytes / max(1, self.layers))

    @property
    def fixed(self) -> int:
        """Everything but the weight window, with the smallest pool."""
        return self.runtime + self.norms + self.activations + self.head + self.kv_bytes(self.min_blocks)

    def total(self, window: int | None, blocks: int | None = None) -> int:
        kv = self.kv_bytes(self.min_blocks if blocks is None else blocks)
        w = self.layers if window is None else window
        return self.runtime + self.norms + self.activations + self.head + kv + w * self.layer_bytes

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

    def blocks_left(self, budget_bytes: int, window: int | None) -> int:
        """KV blocks the budget holds once everything else and `window` layers are in."""
        room = budget_bytes - self.total(window, 0)
        per = self.block_bytes * (1 + 1 / max(1, self.layers))
        return max(0, int(room // per)) if self.block_bytes else 0

    def describe(self, window: int | None, blocks: int | None = None) -> str:
        w = self.layers if window is None else window
        kv = self.min_blocks if blocks is None else blocks
        return (
            f"window {w} x {format_size(self.layer_bytes)} + kv {kv * BLOCK_TOKENS} tokens "
            f"{format_size(self.kv_bytes(kv))} + activations {format_size(self.activations)} + "
            f"head {format_size(self.head)} + runtime {format_size(self.runtime + self.norms)} = "
            f"{format_size(self.total(window, blocks))}"
        )


def activation_bytes(
    cfg: ModelConfig, share: NodeShare, context: int, nbytes: int, limits: EngineLimits = DEFAULT_LIMITS
) -> int:
    """Peak live tensors of one layer's step on this node at the engine's limits (a generous sum
    of the largest ones)."""
    T, C, H, hd = limits.max_step_tokens, limits.prefill_chunk, cfg.hidden_size, cfg.head_dim
    n_q = share.n_kv * cfg.q_per_kv
    hidden = 6 * T * H  # x, h, partials, residual sums, rope'd copies
    qkv = 2 * T * (n_q + 2 * share.n_kv) * hd  # projection + rope'd q/k
    ffn = 3 * T * share.n_ffn  # gate|up [T, 2F] + silu(gate)*up [T, F]
    scores = n_q * C * (context + C)  # attention scores of one prefill chunk
    gqa = 2 * (context + C) * n_q * hd  # a prefill sequence's keys/values repeated to its query heads
    rms = 2 * T * H  # rms_norm works in fp32
    return (hidden + qkv + ffn + scores + gqa) * nbytes + rms * 4


def head_bytes(cfg: ModelConfig, nbytes: float, rows: int = DEFAULT_LIMITS.max_running) -> int:
    """Master only: embedding [V, H] (+ lm_head [V, H] unless tied) and fp32 logits [rows, V].
    `nbytes`: bytes per parameter of the head matrix as held (quantised: under one)."""
    mats = 1 if cfg.tie_embeddings else 2
    return int(mats * cfg.vocab_size * cfg.hidden_size * nbytes) + 4 * rows * cfg.vocab_size


def estimate(
    cfg: ModelConfig,
    share: NodeShare,
    dtype: str = "fp32",
    *,
    context: int | None = None,
    min_kv_tokens: int = MIN_KV_TOKENS,
    is_master: bool = False,
    head: int | None = None,
    runtime: int = RUNTIME_BYTES,
    limits: EngineLimits = DEFAULT_LIMITS,
    weights: WeightBytes | None = None,
    split_head: bool = False,
) -> MemoryEstimate:
    """context: the longest sequence served (default: the model's context length). `weights`:
    bytes per parameter of the matrices as stored (weights/sizes.py; default: dtype's).
    `split_head`: every node holds its lm_head rows (NodeShare.vocab_rows) and their logits; the
    master's embedding is read from the memory-mapped checkpoint."""
    nbytes = dtype_bytes(dtype)
    weights = weights or float_bytes(dtype)
    context = cfg.max_position if context is None else context
    if split_head:
        a, b = share.vocab_rows(cfg)
        head = int((b - a) * cfg.hidden_size * weights.head) + 4 * limits.max_running * (b - a)
    elif is_master and head is None:
        head = head_bytes(cfg, weights.head, limits.max_running)
    return MemoryEstimate(
        layers=cfg.num_layers,
        layer_bytes=int(share.layer_params(cfg) * weights.layer),
        runtime=runtime,
        norms=(2 * cfg.num_layers + 1) * cfg.hidden_size * nbytes,
        activations=activation_bytes(cfg, share, context, nbytes, limits),
        head=head if is_master or split_head else 0,
        block_bytes=2 * cfg.num_layers * share.n_kv * BLOCK_TOKENS * cfg.head_dim * nbytes,
        min_blocks=blocks_for(min(min_kv_tokens, context)) if share.n_kv else 0,
    )


@dataclass(frozen=True)
class NodeMemory:
    """How one node's memory is split: its weight window (None: every layer resident) and the KV
    blocks it can hold (None: it holds no KV heads, any count suits it)."""

    window: int | None
    kv_blocks: int | None


def plan_memory(
    cfg: ModelConfig,
    share: NodeShare,
    budget_bytes: int | None,
    dtype: str = "fp32",
    *,
    budgeted: bool = True,
    is_master: bool = False,
    context: int | None = None,
    kv_blocks: int | None = None,
    limits: EngineLimits = DEFAULT_LIMITS,
    weights: WeightBytes | None = None,
    split_head: bool = False,
) -> NodeMemory:
    """Split `budget_bytes` (an explicit --memory-budget when `budgeted`, else the memory free at
    start, of which the KV pool takes at most UNBUDGETED_KV_TOKENS). `kv_blocks` (--kv-blocks):
    that many blocks are reserved first and the window is fitted around them. None (or 0): the
    memory is not known; everything resident, the unbudgeted pool."""
    if not budget_bytes:
        budget_bytes, budgeted = 2**62, False
    who = "the master" if is_master else f"node {share.node_id}"
    est = estimate(
        cfg, share, dtype, context=context, is_master=is_master, limits=limits, weights=weights, split_head=split_head
    )
    if kv_blocks is not None and share.n_kv:
        return NodeMemory(dataclasses.replace(est, min_blocks=kv_blocks).largest_window(budget_bytes, who), kv_blocks)
    window = est.largest_window(budget_bytes, who)
    if not share.n_kv:
        return NodeMemory(window, None)
    blocks = est.blocks_left(budget_bytes, window)
    if not budgeted:
        blocks = min(blocks, blocks_for(UNBUDGETED_KV_TOKENS))
    return NodeMemory(window, blocks)
