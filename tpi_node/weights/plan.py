"""The partition plan: which KV-head groups and FFN columns each node holds.

Units are KV-head groups (a KV head with its q_per_kv query heads) and FFN column blocks. Every
node gets a share of the layer's work proportional to its capacity weight (measured speed in
coarse steps when every node has one, else CPU cores: `capacity_weights`); uneven splits are
normal (3 KV heads over 2 nodes, or more nodes than KV heads, where some nodes hold FFN columns
only). The plan is a frozen value; each node's share of it names its slice set in the shard
cache. Rank 0 is always the master; ranks follow the order of `caps` (cluster/membership.py
sorts the workers by node id, so the order they joined in does not matter).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.proto import tpi_pb2 as pb

FFN_BLOCK = 32  # FFN columns are assigned in blocks of this many (a SIMD-friendly width)
VOCAB_BLOCK = 64  # lm_head rows of a split head are assigned in blocks of this many


class PlanError(UserError):
    pass


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    memory_bytes: int  # what this node may use for weights + KV cache (its budget)
    cores: int = 1
    disk_bytes: int = 0
    speed: float | None = None  # measured, relative (higher = faster); None when unknown
    budgeted: bool = False  # memory_bytes is a --memory-budget (else: the memory free at start)

    def to_pb(self) -> pb.Capacity:
        msg = pb.Capacity(
            memory_bytes=self.memory_bytes, cores=self.cores, disk_bytes=self.disk_bytes, budgeted=self.budgeted
        )
        if self.speed is not None:
            msg.speed = self.speed
        return msg

    @classmethod
    def from_pb(cls, node_id: str, msg: pb.Capacity) -> NodeCapacity:
        speed = msg.speed if msg.HasField("speed") else None
        return cls(node_id, int(msg.memory_bytes), max(1, int(msg.cores)), int(msg.disk_bytes), speed, msg.budgeted)


@dataclass(frozen=True)
class NodeShare:
    node_id: str
    rank: int
    kv_start: int
    kv_end: int
    ffn_start: int
    ffn_end: int

    @property
    def n_kv(self) -> int:
        return self.kv_end - self.kv_start

    @property
    def n_ffn(self) -> int:
        return self.ffn_end - self.ffn_start

    def vocab_rows(self, cfg: ModelConfig, vocab: int | None = None) -> tuple[int, int]:
        """The lm_head rows [a, b) this node holds when the head is split by vocabulary (--head-split):
        its share of the FFN columns, in blocks of VOCAB_BLOCK, so a share's range is a function of
        its FFN range (which names its slice set) and neighbours' ranges meet. A node without FFN
        columns holds none."""
        vocab, cols = vocab or cfg.vocab_size, cfg.intermediate_size

        def at(col: int) -> int:
            return vocab if col >= cols else vocab * col // cols // VOCAB_BLOCK * VOCAB_BLOCK

        return at(self.ffn_start), at(self.ffn_end)

    def layer_params(self, cfg: ModelConfig) -> int:
        """Parameters of this node's slice of one layer."""
        h, hd, g = cfg.hidden_size, cfg.head_dim, cfg.q_per_kv
        attn = self.n_kv * hd * h * (2 * g + 2)  # q + o (g heads each) + k + v
        bias = self.n_kv * hd * (g + 2) if cfg.attention_bias else 0
        return attn + bias + 3 * h * self.n_ffn


@dataclass(frozen=True)
class PartitionPlan:
    model_digest: str
    shares: tuple[NodeShare, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def world_size(self) -> int:
        return len(self.shares)

    def share_of(self, rank: int) -> NodeShare:
        return self.shares[rank]

    def vocab_ranges(self, cfg: ModelConfig) -> list[tuple[int, int]]:
        """Every rank's lm_head rows of a split head, in rank order (NodeShare.vocab_rows)."""
        return [s.vocab_rows(cfg) for s in self.shares]

    def to_dict(self) -> dict:
        return {"model_digest": self.model_digest, "shares": [asdict(s) for s in self.shares]}

    @classmethod
    def from_dict(cls, d: dict) -> PartitionPlan:
        return cls(d["model_digest"], tuple(NodeShare(**s) for s in d["shares"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> PartitionPlan:
        return cls.from_dict(json.loads(s))


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Split `total` units proportionally to `weights` (ties go to the lower index)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    out = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


SPEED_TIE = 2.0  # speeds within this factor of the slowest node's count as equal
SPEED_STEP = 4.0  # beyond it, a node's weight grows in steps of this factor


def speed_weight(ratio: float) -> float:
    """The weight of a node `ratio` times as fast as the slowest: 1 up to SPEED_TIE, then
    SPEED_STEP**k for a ratio in (SPEED_TIE * SPEED_STEP**(k-1), SPEED_TIE * SPEED_STEP**k]
    (4 for 2x-8x, 16 for 8x-32x, ...). Each step is centred on its weight (in log scale), so a
    node whose true ratio is a weight (1, 4, 16, ...) stays in its step while the measurements
    err by less than 2x between them (+-30% on every node: at most 1.3 / 0.7 = 1.86x)."""
    k = 0
    while ratio > SPEED_TIE * SPEED_STEP**k:
        k += 1
    return SPEED_STEP**k


def capacity_weights(caps: list[NodeCapacity]) -> list[float]:
    """Measured speed when every node has one, else CPU cores.

    Speeds are coarse on purpose: a node's share names the slices it caches, so the same machines
    must get the same plan on every start. A short measurement on shared cores is noisy (one gave the
    master 6 of 8 KV heads of two equal nodes), so equal machines (within SPEED_TIE of the
    slowest) get equal shares, and faster ones whole steps of SPEED_STEP (`speed_weight`): a
    real change of capacity (a GPU, a machine several times faster) changes the plan, noise does
    not, unless a node sits near a step's edge (a 2x or 8x ratio)."""
    if all(c.speed for c in caps):
        slowest = min(c.speed for c in caps)
        return [speed_weight(c.speed / slowest) for c in caps]
    return [float(max(1, c.cores)) for c in caps]


def make_plan(
    cfg: ModelConfig, caps: list[NodeCapacity], model_digest: str = "", bytes_per_param: float = 4
) -> PartitionPlan:
    """Split one layer's work over the nodes by capacity weight.

    KV-head groups go first (largest remainder on the weights); then FFN blocks fill each node up
    to its target share of the layer's parameters, so a node with fewer heads gets more columns.
    """
    if not caps:
        raise PlanError("a plan needs at least one node")
    ids = [c.node_id for c in caps]
    if len(set(ids)) != len(ids):
        raise PlanError(f"duplicate node ids in the cluster: {sorted(ids)}")
    weights = capacity_weights(caps)
    kv = _largest_remainder(cfg.num_kv_heads, weights)

    h, hd, g = cfg.hidden_size, cfg.head_dim, cfg.q_per_kv
    per_kv = hd * h * (2 * g + 2)
    per_block = 3 * h * FFN_BLOCK
    n_blocks, tail = divmod(cfg.intermediate_size, FFN_BLOCK)
    total = cfg.num_kv_heads * per_kv + n_blocks * per_block
    # Target FFN blocks per node: its share of the whole layer minus what its heads already cost.
    want = [max(0.0, total * w / sum(weights) - kv[i] * per_kv) / per_block for i, w in enumerate(weights)]
    if sum(want) == 0:
        want = weights
    blocks = _largest_remainder(n_blocks, want)

    shares, kv_at, col = [], 0, 0
    for rank, c in enumerate(caps):
        cols = blocks[rank] * FFN_BLOCK + (tail if rank == len(caps) - 1 else 0)
        shares.append(NodeShare(c.node_id, rank, kv_at, kv_at + kv[rank], col, col + cols))
        kv_at, col = kv_at + kv[rank], col + cols
    plan = PartitionPlan(model_digest or cfg.digest, tuple(shares))
    check_memory(cfg, plan, caps, bytes_per_param)
    return plan


def min_node_bytes(cfg: ModelConfig, share: NodeShare, dtype_bytes: float = 4) -> int:
    """The least memory a node can serve its share with: a window of two layer slices
    (`dtype_bytes` per parameter as stored: under one for quantised weights)."""
    return int(2 * share.layer_params(cfg) * dtype_bytes)


def check_memory(cfg: ModelConfig, plan: PartitionPlan, caps: list[NodeCapacity], dtype_bytes: float = 4) -> None:
    for share, cap in zip(plan.shares, caps):
        need = min_node_bytes(cfg, share, dtype_bytes)
        if cap.memory_bytes and cap.memory_bytes < need:
            raise PlanError(
                f"node {cap.node_id} has {cap.memory_bytes / 2**20:.0f} MiB but its share needs at least "
                f"{need / 2**20:.0f} MiB (two layers of its slice); add nodes or memory"
            )
