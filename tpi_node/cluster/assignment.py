"""The Assignment wire type: what an accepted Join tells a worker (the JoinReply of tpi.proto).

reply = Assignment(...).to_pb()             # master
a = Assignment.from_pb(reply)               # worker: validated, typed
"""

from __future__ import annotations

from dataclasses import dataclass

from tpi_node.comm.codec import FrameError, dtype_enum, dtype_of_enum, wire_name
from tpi_node.dtypes import DTYPE_NAMES
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.settings import ACT_QUANTS, QUANTS
from tpi_node.weights.plan import NodeShare, PartitionPlan
from tpi_node.weights.slicer import ShardFile


@dataclass(frozen=True)
class Assignment:
    rank: int
    plan: PartitionPlan
    window: int | None  # layers of its slice the worker keeps in memory (None: all, resident)
    kv_blocks: int  # blocks of its paged KV cache (the same count on every node)
    model_digest: str
    model_config_json: str  # the HF config.json of the model, verbatim
    files: tuple[ShardFile, ...]  # this rank's shard files
    wire: str  # format of Partial/Reduced tensors: "fp32" | "bf16" | "fp16" | "int8"
    shard_dtype: str  # dtype of the weights in the shard files
    version: str  # the master's
    model_name: str
    ticket: bytes  # secret of this join: FetchShard and Session must show it
    collective_init: str = ""  # tcp://HOST:PORT of a gloo group that sums instead of the star
    shard_quant: str = "none"  # --quant of the shard files (names the worker's cache)
    split_head: bool = False  # the lm_head is split by vocabulary: head.safetensors is in `files`
    act_quant: str = "none"  # --act-quant: how this node's quantised matmuls take their input

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def share(self) -> NodeShare:
        return self.plan.share_of(self.rank)

    def to_pb(self) -> pb.JoinReply:
        return pb.JoinReply(
            accepted=True,
            rank=self.rank,
            world_size=self.world_size,
            plan_json=self.plan.to_json(),
            plan_digest=self.plan.digest,
            model_digest=self.model_digest,
            model_config_json=self.model_config_json,
            files=[f.to_pb() for f in self.files],
            wire_dtype=dtype_enum(self.wire),
            shard_dtype=self.shard_dtype,
            version=self.version,
            model_name=self.model_name,
            ticket=self.ticket,
            collective_init=self.collective_init,
            window=self.window or 0,
            kv_blocks=self.kv_blocks,
            shard_quant=self.shard_quant,
            split_head=self.split_head,
            act_quant=self.act_quant,
        )

    @classmethod
    def from_pb(cls, reply: pb.JoinReply) -> Assignment:
        """An accepted JoinReply -> Assignment; FrameError when it does not hold together."""
        try:
            plan = PartitionPlan.from_json(reply.plan_json)
        except (ValueError, KeyError, TypeError) as e:
            raise FrameError(f"the master sent an unreadable plan: {e}") from None
        if plan.digest != reply.plan_digest or not 1 <= reply.rank < plan.world_size:
            raise FrameError(f"the master's plan does not match its digest or rank {reply.rank}")
        if reply.shard_dtype not in DTYPE_NAMES:
            raise FrameError(f"the master's shards have an unknown dtype '{reply.shard_dtype}'")
        if (reply.act_quant or "none") not in ACT_QUANTS:
            raise FrameError(f"the master asks for unknown activations '{reply.act_quant}'")
        if (reply.shard_quant or "none") not in QUANTS:
            raise FrameError(f"the master's shards have an unknown quantisation '{reply.shard_quant}'")
        return cls(
            rank=reply.rank,
            plan=plan,
            window=reply.window or None,
            kv_blocks=reply.kv_blocks,
            model_digest=reply.model_digest,
            model_config_json=reply.model_config_json,
            files=tuple(ShardFile.from_pb(f) for f in reply.files),
            wire=wire_name(dtype_of_enum(reply.wire_dtype)),
            shard_dtype=reply.shard_dtype,
            version=reply.version,
            model_name=reply.model_name,
            ticket=bytes(reply.ticket),
            collective_init=reply.collective_init,
            shard_quant=reply.shard_quant or "none",
            split_head=reply.split_head,
            act_quant=reply.act_quant or "none",
        )
