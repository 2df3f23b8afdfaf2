"""NodeRunner: the one forward loop every node runs over its own slice of every layer, and
`open_runner`, which opens a rank's slices where the checkpoint is (read in place) or, for float
weights that --quant quantises, in the shard cache."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi_node import heap
from tpi_node.comm.collective import Collective, InFlight
from tpi_node.dtypes import torch_dtype
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.head import VocabShard
from tpi_node.engine.kv_cache import PagedKVCache
from tpi_node.engine.vocab import HeadAsk, HeadResult, vocab_step
from tpi_node.model.config import ModelConfig
from tpi_node.model.decode_ops import DecodeStack
from tpi_node.model.layers import Rope, attention_partial, mlp_partial, rms_norm
from tpi_node.model.qkernel import TUNING, tune
from tpi_node.weights.cache import Lease, hold
from tpi_node.weights.head_rows import HEAD_FILE
from tpi_node.weights.plan import NodeShare, PartitionPlan
from tpi_node.weights.slicer import shard_dir, write_node_shards
from tpi_node.weights.source import CheckpointSlices, in_place
from tpi_node.weights.store import ShardStore


@dataclass
class StepStats:
    """Seconds of the last steps, split so that compute + comm + stall = wall."""

    steps: int = 0
    tokens: int = 0
    split_steps: int = 0  # of them, run as two halves (the token split)
    wall_s: float = 0.0
    comm_s: float = 0.0
    stall_s: float = 0.0
    head_s: float = 0.0  # the split head's part of the steps (its rows' logits + the gather)
    head_comm_s: float = 0.0  # of it, in the gather (the master: waiting for every node's rows)

    @property
    def compute_s(self) -> float:
        return self.wall_s - self.comm_s - self.stall_s

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "split_steps": self.split_steps,
            "wall_s": self.wall_s,
            "comm_s": self.comm_s,
            "stall_s": self.stall_s,
            "compute_s": self.compute_s,
            "head_s": self.head_s,
            "head_comm_s": self.head_comm_s,
        }


PARALLEL_MIN_TOKENS = 32  # steps with fewer tokens compute on one thread (see _threads_for)


class NodeRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        store: ShardStore,
        share: NodeShare,
        coll: Collective,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        kv_blocks: int = 0,
        lease: Lease | None = None,
        head: VocabShard | None = None,
        vocab_ranges: list[tuple[int, int]] | None = None,
    ) -> None:
        """head: this node's lm_head rows when the head is split by vocabulary; vocab_ranges:
        every rank's rows (NodeShare.vocab_rows), in rank order."""
        self.cfg, self.store, self.share, self.coll = cfg, store, share, coll
        self.head, self.vocab_ranges = head, vocab_ranges or []
        self.lease = lease  # on the shard cache's slice set the store reads, released at close
        self.dtype, self.device = dtype, torch.device(device)
        # the paged KV cache of this node's heads; an FFN-only node holds none
        self.kv = PagedKVCache(
            cfg.num_layers, share.n_kv, cfg.head_dim, dtype, self.device, kv_blocks if share.n_kv else 0
        )
        self.rope = Rope(cfg, self.device)
        self.stats = StepStats()
        self.max_threads = torch.get_num_threads()
        samples = store.sample_matrices()
        if samples and self.device.type == "cpu":
            # which way each step size runs, and on how many threads the kernel's own pool runs a
            # decode step's quantised matmuls, measured on this machine with this node's matrix
            print(f"[tpi-node] {tune(samples, self.max_threads).describe()}", file=sys.stderr, flush=True)
            heap.trim(collect=False)  # its timing runs' buffers (~28 MiB for SmolLM2), before the head loads
        self.stack = self._decode_stack()
        if self.stack is not None:
            where = "one node" if self.coll.world_size == 1 else "each half layer's sum asked of the collective"
            print(f"[tpi-node] decode steps: every layer in one C call ({where}, all layers resident)", file=sys.stderr)

    def _decode_stack(self) -> DecodeStack | None:
        """The layer loop of a decode step as one call (model/decode_ops.py), where this node may
        take it: every layer resident, quantised, fp32 on the CPU, with heads of its own. Alone,
        the allreduce is the partial itself; in a cluster the call asks the collective for each
        sum (`reduce_partial`). Otherwise (streaming, float or GPU weights) the loop below runs."""
        # (a CPU node's collective adds and norms plainly: only a CUDA one fuses them, gpu/fused.py)
        if self.store.streaming or self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        if not self.share.n_kv:
            return None
        layers = []
        for i in range(self.cfg.num_layers):
            with self.store.layer(i) as w:  # resident: the same object for the store's life
                layers.append(w)
        norms = self.store.norms
        return DecodeStack.of(layers, self.kv.k, self.kv.v, norms.post, [*norms.input[1:], norms.final])

    def _threads_for(self, tokens: int) -> None:
        """Small steps (decode) run torch on one thread: their float matrix-vector products are too
        short for a thread team's wake-up to pay (measured on 2 cores: 22 ms/token on 1 thread vs 30
        on 2 for SmolLM2 in fp32); quantised matmuls use the kernel's own pool, as `tune` measured.
        Prefill chunks use every thread."""
        want = 1 if tokens < PARALLEL_MIN_TOKENS else self.max_threads
        if self.device.type == "cpu" and torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _all_decode(self, layout: BatchLayout) -> bool:
        """Every sequence of the step decodes one token, and the kernel takes a step this size."""
        index = self.kv.index
        return len(index.decode) == layout.num_tokens <= TUNING.kernel_max_tokens

    def split_at(self, n_tokens: int) -> int:
        """Where a step of n_tokens is cut in two halves (0: not split): the collective says."""
        return self.coll.split_at(n_tokens)

    @torch.inference_mode()
    def forward(self, layout: BatchLayout, x: torch.Tensor, step_id: int = 0, cut: int | None = None) -> torch.Tensor:
        """x: [T, H] embedded tokens of the step -> [T, H] final-normed hidden states.
        `step_id` tags the step's collectives and `cut` splits its tokens (default: `split_at`);
        every node of the step passes the same ones (the master's, from the Step frame)."""
        cut = self.split_at(layout.num_tokens) if cut is None else cut  # 0 unless the collective overlaps halves
        if not 0 <= cut < max(layout.num_tokens, 1):
            raise ValueError(f"cannot split a step of {layout.num_tokens} tokens at {cut}")
        self.coll.begin_step(step_id)
        self._threads_for(layout.num_tokens)
        if self.share.n_kv:
            self.kv.begin(layout)  # ValueError when the block tables do not cover the step
        t0, comm0, stall0 = time.perf_counter(), self.coll.stats.seconds, self.store.stats.stall_s
        cfg, norms, eps = self.cfg, self.store.norms, self.cfg.rms_eps
        x = x.to(self.device, self.dtype)
        rope_cs = self.rope.tables(layout.positions().to(self.device), self.dtype)
        h = rms_norm(x, norms.input[0], eps)
        whole = self.stack is not None and not cut and self._all_decode(layout)
        if whole:  # the loop below, as one call (the same arithmetic, bit for bit)
            x = x.clone()  # updated in place: not the caller's tensor
            reduce = self.coll.reduce_partial if self.coll.world_size > 1 else None
            self.stack.run(x, h, self.kv.index, *rope_cs, cfg.head_dim, eps, reduce)
        if cut:
            h = self._split_layers(layout, x, h, rope_cs, cut)
            self.stats.split_steps += 1
        for i in range(0 if cut or whole else cfg.num_layers):
            with self.store.layer(i) as w:
                a = attention_partial(h, w, self.kv.layer(i), layout, rope_cs, cfg.head_dim)
                x, h = self.coll.allreduce_add_norm(a, x, norms.post[i], eps)
                nxt = norms.input[i + 1] if i + 1 < cfg.num_layers else norms.final
                x, h = self.coll.allreduce_add_norm(mlp_partial(h, w), x, nxt, eps)
        s = self.stats
        s.steps, s.tokens = s.steps + 1, s.tokens + layout.num_tokens
        s.wall_s += time.perf_counter() - t0
        s.comm_s += self.coll.stats.seconds - comm0
        s.stall_s += self.store.stats.stall_s - stall0
        return h

    @torch.inference_mode()
    def vocab_step(self, h: torch.Tensor, ask: HeadAsk) -> HeadResult | None:
        """The split head's part of the step (engine/vocab.py), right after `forward`: every node of
        the step calls it with the same ask; the master gets the merged result."""
        if self.head is None:
            raise ValueError("this node holds no lm_head rows: the head is not split")
        t0, comm0 = time.perf_counter(), self.coll.stats.seconds
        out = vocab_step(self.head, h, ask, self.coll, self.vocab_ranges)
        self.stats.head_s += time.perf_counter() - t0
        self.stats.head_comm_s += self.coll.stats.seconds - comm0
        return out

    def _split_layers(self, layout: BatchLayout, x, h, rope_cs, cut: int) -> torch.Tensor:
        """The same layer loop over the step cut in two halves (TokenWeave, gpu/split.py): stage
        k of the second half runs after stage k of the first (its attention sees the keys the
        first half wrote). On the collective's two CUDA streams one half's allreduce overlaps
        the other half's compute; without streams (the star) each stage computes and *starts* its
        allreduce, and the half's next stage waits for it, so A's sum travels while B computes.
        -> h [T, H]."""
        from tpi_node.gpu.split import run_split  # only the star and GPU groups split

        cfg, norms, eps, coll = self.cfg, self.store.norms, self.cfg.rms_eps, self.coll
        parts, bounds = layout.split(cut), (slice(0, cut), slice(cut, layout.num_tokens))
        index = []
        for part in parts:
            if self.share.n_kv:
                self.kv.begin(part)
            index.append(self.kv.index)
        ropes = [(rope_cs[0][b], rope_cs[1][b]) for b in bounds]
        states, streams = [(x[b], h[b]) for b in bounds], coll.split_streams()

        def settle(s):  # a half's (x, h), waiting for its sum when it is still on the wire
            return coll.wait_add_norm(s) if isinstance(s, InFlight) else s

        for i in range(cfg.num_layers):
            nxt = norms.input[i + 1] if i + 1 < cfg.num_layers else norms.final
            with self.store.layer(i) as w:
                _used_on(w, streams)

                def attn(p, _, s, w=w, i=i):
                    kv = self.kv.layer(i, index[p])
                    x, h = settle(s)
                    return x, attention_partial(h, w, kv, parts[p], ropes[p], cfg.head_dim)

                def post(p, _, s, i=i):
                    return coll.allreduce_add_norm(s[1], s[0], norms.post[i], eps)

                def mlp(p, _, s, w=w):
                    x, h = settle(s)
                    return x, mlp_partial(h, w)

                def pre(p, _, s, nxt=nxt):
                    return coll.allreduce_add_norm(s[1], s[0], nxt, eps)

                if streams is None:  # [attention + start its sum, wait + mlp + start its sum]

                    def attn_start(p, b, s, i=i):
                        x, a = attn(p, b, s)
                        return coll.start_add_norm(a, x, norms.post[i], eps)

                    def mlp_start(p, b, s, nxt=nxt):
                        x, m = mlp(p, b, s)
                        return coll.start_add_norm(m, x, nxt, eps)

                    stages = (attn_start, mlp_start)
                else:
                    stages = (attn, post, mlp, pre)
                states = run_split(states, bounds, stages, streams)
        return torch.cat([settle(s)[1] for s in states])

    def node_stats(self) -> dict:
        """This node's counters for Driver.stats(): steps, weights streamed, KV pool, memory."""
        return {**self.stats.as_dict(), **self.store.stats.as_dict(), "kv_pool_bytes": self.kv.nbytes()}

    def close(self) -> None:
        self.store.close()
        self.coll.close()
        if self.lease is not None:
            self.lease.release()


def _used_on(w, streams) -> None:
    """A streamed layer's weights are freed when the layer is released: tell the caching allocator
    they were used on the split's side streams too."""
    for t in getattr(w, "__dict__", {}).values() if streams else ():
        if isinstance(t, torch.Tensor) and t.is_cuda:
            for st in streams:
                t.record_stream(st)


def open_runner(
    model_dir: Path,
    cfg: ModelConfig,
    plan: PartitionPlan,
    rank: int,
    coll: Collective,
    dtype: str = "fp32",
    window: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    kv_blocks: int = 0,
    quant: str = "none",
    split_head: bool = False,
) -> NodeRunner:
    """Open rank's slices with a paged KV cache of `kv_blocks` blocks: read from the checkpoint
    in place (no copy on disk), unless --quant quantises float weights, which are sliced once into
    the shard cache (weights/source.py says why). `split_head`: with its lm_head rows too."""
    share, lease, head, td = plan.share_of(rank), None, None, torch_dtype(dtype)
    try:
        if in_place(model_dir, quant):
            source = CheckpointSlices(model_dir, cfg, share, dtype, quant)
            if split_head:
                head = VocabShard.from_checkpoint(
                    model_dir, cfg, share.vocab_rows(cfg), td, device, quant, window is None
                )
        else:
            source = shard_dir(plan.model_digest, plan, rank, dtype, quant)
            lease = hold(source)  # no cache eviction or prune removes the set while this runner reads it
            write_node_shards(model_dir, cfg, plan, rank, source, dtype, progress, quant, split_head)
            if split_head:
                head = VocabShard.from_file(source / HEAD_FILE, share.vocab_rows(cfg), td, device, window is None)
        store = ShardStore(source, cfg, share, window=window, device=device)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    ranges = plan.vocab_ranges(cfg) if split_head else None
    return NodeRunner(cfg, store, share, coll, td, device, kv_blocks, lease, head, ranges)
