"""The composition root: the one place that turns settings into running parts - the device and
dtype, the collective each node computes with, the shard store (through the runner), the master
and its engine. Commands call these; nothing below this layer reads settings.

    engine = build_local_engine("smollm2-135m-instruct")                   # one node, in process
    master, engine, port = start_master(settings, nodes=3, grpc_port=0)   # the cluster's master

`choose_fast_path` decides, once per node, what the GPU fast path runs (gpu/detect.py says what
the machine allows, --fast-path whether to use it); `make_master_collective` /
`make_worker_collective` build the collective it names (the fused kernel on one CUDA node, NCCL
between GPUs of one NVLink domain) or the star / gloo ring otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from tpi_node import heap
from tpi_node.cluster.assignment import Assignment
from tpi_node.cluster.auth import resolve_token
from tpi_node.cluster.deployment import ClusterSpec, MakeCollective
from tpi_node.cluster.driver import ClusterDriver
from tpi_node.cluster.identity import claim
from tpi_node.cluster.identity import node_id as machine_node_id
from tpi_node.cluster.link import MasterLink
from tpi_node.cluster.master import ClusterMaster
from tpi_node.cluster.sessions import Sessions
from tpi_node.cluster.tls import TlsFiles, tls_files
from tpi_node.comm.collective import Collective, LocalCollective
from tpi_node.comm.nccl import GroupInit, NcclCollective
from tpi_node.comm.star import StarHub, StarSpoke
from tpi_node.comm.torch_dist import GlooCollective
from tpi_node.dtypes import torch_dtype
from tpi_node.engine.budget import plan_memory
from tpi_node.engine.device import DeviceInfo, default_dtype, device_capacity, select_device
from tpi_node.engine.draft import DraftModel, vocab_difference
from tpi_node.engine.engine import Engine
from tpi_node.engine.head import ModelHead
from tpi_node.engine.limits import BLOCK_TOKENS, DEFAULT_LIMITS, EngineLimits
from tpi_node.engine.local import LocalDriver
from tpi_node.engine.runner import open_runner
from tpi_node.engine.vocab import choose_head_split
from tpi_node.errors import UserError
from tpi_node.gpu.detect import GpuDecision, detect, detect_and_log
from tpi_node.gpu.split import DEFAULT_THRESHOLD, STAR_THRESHOLD, split_threshold
from tpi_node.model.config import ModelConfig
from tpi_node.model.qkernel import use_act_quant
from tpi_node.model.tokenizer import Tokenizer
from tpi_node.settings import MasterSettings, TlsOptions
from tpi_node.weights.checkpoint import model_digest
from tpi_node.weights.plan import NodeCapacity, PartitionPlan, make_plan
from tpi_node.weights.prepare import resolve_model
from tpi_node.weights.sizes import weight_bytes

log = logging.getLogger("tpi_node.compose")


def say(msg: str) -> None:
    print(f"[tpi-node] {msg}", file=sys.stderr, flush=True)


# ---- settings -> values --------------------------------------------------------------------------
def tls_for(s: TlsOptions, role: str, cert_name: str | None = None) -> TlsFiles | None:
    """TlsFiles from the TLS settings, or None (plaintext)."""
    return tls_files(role, s.tls_cert, s.tls_key, s.tls_ca, s.certs, cert_name)


def node_id_for(s, role: str) -> str:
    """--node-id, else this machine's id for the role (claimed: a second process of the same
    machine and home gets a derived one, and says so)."""
    return s.node_id or claim(machine_node_id(role=role))


def capacity_for(
    node_id: str, info: DeviceInfo, budget: int | None, dtype: str | None, speed: float | None
) -> NodeCapacity:
    """This node's capacity for the plan: memory of the device it computes on and its speed
    (measured unless given)."""
    cap = device_capacity(node_id, info, budget, dtype)
    return dataclasses.replace(cap, speed=speed) if speed else cap


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---- the GPU fast path ----------------------------------------------------------------------------
GROUP_KINDS = ("nccl", "multimem")  # an NVLink group's collective_init: "nccl+tcp://:PORT"


@dataclass(frozen=True)
class FastPath:
    """What a node's forward loop runs: `kind` off (add+RMSNorm in torch; the star or gloo between
    nodes), fused (one CUDA node: the fused add+RMSNorm kernel), nccl or multimem (every node a
    GPU of this machine's NVLink domain). `summary` is the line said at start."""

    kind: str
    reason: str
    nodes: int = 1
    between: str = ""  # off, several nodes: what sums their partials
    fused_kernel: bool = False  # nccl: the fused kernel after the allreduce (Triton is there)

    def summary(self) -> str:
        if self.kind == "fused":
            return f"fast path: the fused add+RMSNorm Triton kernel in the forward loop ({self.reason})"
        if self.kind in GROUP_KINDS:
            sums = (
                "one multimem AllReduce+residual+RMSNorm kernel over NVLink multicast"
                if self.kind == "multimem"
                else "NCCL allreduce over NVLink, then add+RMSNorm "
                + ("in the fused Triton kernel" if self.fused_kernel else "in torch (no Triton)")
            )
            return (
                f"fast path: {sums} between {self.nodes} GPUs; long steps run as two halves on two CUDA "
                f"streams (--token-split) ({self.reason})"
            )
        return f"fast path off: {self.reason} (add+RMSNorm in torch{self.between and ', ' + self.between})"


def choose_fast_path(
    mode: str,
    decision: GpuDecision,
    device: str,
    nodes: int = 1,
    gpus: tuple[int, ...] = (),
    collective: str = "star",
    secured: bool = False,
) -> FastPath:
    """The fast path of a node computing on `device` in a plan of `nodes` nodes. `gpus`: the CUDA
    device of every node when all of them are local processes on distinct GPUs of this machine
    (local_gpus); `secured`: a cluster token or TLS (torch.distributed's store would be an
    unauthenticated way in, as gloo's is)."""
    between = "" if nodes == 1 else f"partial sums over {'a gloo ring' if collective == 'gloo' else 'the gRPC star'}"
    off = lambda why: FastPath("off", why, nodes, between)
    if mode == "off":
        return off("--fast-path off")
    if not device.startswith("cuda"):
        return off(f"this node computes on {device}")
    if nodes == 1:
        if not decision.fused_kernel:
            return off("; ".join(decision.notes) or f"the fused kernel needs sm_80 or newer ({decision.reason})")
        index = int(device.partition(":")[2] or 0)
        gpu = next((g for g in decision.gpus if g.index == index), None)
        return FastPath("fused", f"1 node on {device}" + (f", {gpu.name}" if gpu else ""))
    if decision.collective not in GROUP_KINDS:
        return off(decision.reason)
    if collective == "gloo" or secured:
        return off("--collective gloo" if collective == "gloo" else "a cluster token or TLS: NCCL's store is open")
    if len(set(gpus)) != nodes:
        return off("not every node is a GPU of this machine's NVLink domain")
    return FastPath(decision.collective, decision.reason, nodes, fused_kernel=decision.fused_kernel)


def local_gpus(mode: str, device: str, nodes: int, decision: GpuDecision) -> tuple[int, ...]:
    """The CUDA device of each of `nodes` local nodes (master first) when they can be one NVLink
    group: one GPU each; () otherwise (every node computes on `device`)."""
    if mode == "off" or nodes < 2 or device not in ("auto", "cuda") or decision.collective not in GROUP_KINDS:
        return ()
    return tuple(g.index for g in decision.gpus[:nodes]) if len(decision.gpus) >= nodes else ()


def parse_gpus(spec: str | None) -> tuple[int, ...]:
    """--gpus: "all" or "0,2" -> the CUDA device of each node (); UserError for a GPU not here."""
    if not spec:
        return ()
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--gpus {spec}: this machine has no CUDA device")
    if spec.strip().lower() == "all":
        return tuple(range(count))
    try:
        ids = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--gpus '{spec}': use all or GPU numbers such as 0,1") from None
    if not ids or len(set(ids)) != len(ids) or not all(0 <= i < count for i in ids):
        raise UserError(f"--gpus {spec}: this machine has GPUs 0..{count - 1} (each may be named once)")
    return ids


def local_gpus_for(s: MasterSettings, nodes: int) -> tuple[int, ...]:
    """local_gpus for a local cluster of `nodes` started with settings `s` (run, generate --nodes,
    serve --gpus): detection is asked only where CUDA is."""
    if s.fast_path == "off" or nodes < 2 or select_device(s.device).kind != "cuda":
        return ()
    return local_gpus(s.fast_path, s.device, nodes, detect())


def detect_for(info: DeviceInfo, decision: GpuDecision | None = None) -> GpuDecision:
    """Detection (logged) for a node computing on `info`; a CPU or MPS node asks the machine nothing."""
    if decision is not None:
        return decision
    if info.kind != "cuda":
        return GpuDecision("off", False, f"this node computes on {info.device}")
    return detect_and_log()


def group_collective(
    kind: str, init_method: str, rank: int, world_size: int, device: str, split: int = DEFAULT_THRESHOLD
) -> NcclCollective:
    """This rank's NCCL collective of an NVLink group (joined in its first collective); `split`:
    the fewest tokens of a step that splits (the master's; a worker follows its Step frames)."""
    decision = dataclasses.replace(detect(), collective=kind)  # the master chose the kind for all
    return NcclCollective(decision, init=GroupInit(init_method, rank, world_size, device=device), split_threshold=split)


def token_split_line(mode: str | int, fast: FastPath, collective: str) -> str:
    """What --token-split means for this master's collective, said at start."""
    if fast.kind in GROUP_KINDS:
        n, over = split_threshold(mode, DEFAULT_THRESHOLD), "on two CUDA streams"
    elif collective == "gloo":
        return "token split: off (a gloo ring does not split)"
    else:
        n, over = split_threshold(mode, STAR_THRESHOLD), "over the star (one half's sum travels, the other computes)"
    if n == 0:
        return "token split: off (--token-split off)"
    return f"token split: steps of >= {n} tokens run as two halves {over} (--token-split {mode})"


# ---- collectives ---------------------------------------------------------------------------------
def make_master_collective(
    spec: ClusterSpec, alone: FastPath | None = None, token_split: str | int = "auto"
) -> MakeCollective:
    """What rank 0 sums with, for each plan: one node alone needs no network (`alone`: its fast
    path, the fused kernel on a CUDA node); an NVLink group of local GPUs sums with NCCL; the star
    hub meets the workers' partials on their sessions; with --collective gloo a gloo ring sums
    instead (the sessions then only carry steps). `token_split`: --token-split, for the star and
    the NVLink group (gloo never splits)."""

    def make(plan: PartitionPlan, sessions: Sessions) -> Collective:
        if plan.world_size == 1:
            return LocalCollective(fused=alone is not None and alone.kind == "fused")
        kind, plus, url = spec.collective_init.partition("+")
        if plus and kind in GROUP_KINDS:
            split = split_threshold(token_split, DEFAULT_THRESHOLD)
            return group_collective(
                kind, url.replace("tcp://:", "tcp://127.0.0.1:"), 0, plan.world_size, spec.device, split
            )
        if spec.collective_init:
            return GlooCollective(
                spec.collective_init.replace("tcp://:", "tcp://127.0.0.1:"),
                0,
                plan.world_size,
                spec.wire,
                timeout_s=max(30.0, spec.peer_timeout_s),
                lazy=True,
            )
        split = split_threshold(token_split, STAR_THRESHOLD)
        hub = StarHub(sessions.shared, plan.world_size, sessions, spec.wire, spec.peer_timeout_s, split)
        sessions.partials = hub
        return hub

    return make


def make_worker_collective(a: Assignment, link: MasterLink, master: str, device: str = "cuda") -> Collective:
    """A worker's collective for its assignment: the star spoke on its session, or the group the
    master named (reached at the address the worker dials the master by): the NCCL group of an
    NVLink domain (this worker computes on `device`), or a gloo ring."""
    if not a.collective_init:
        return StarSpoke(link, a.rank, a.world_size, a.wire)
    kind, plus, url = a.collective_init.partition("+")
    host = master.rpartition(":")[0]
    if plus and kind in GROUP_KINDS:
        say(f"partial sums in the NVLink group ({kind}, rank {a.rank} of {a.world_size} on {device})")
        return group_collective(kind, url.replace("tcp://:", f"tcp://{host}:"), a.rank, a.world_size, device)
    init = a.collective_init.replace("tcp://:", f"tcp://{host}:")
    say(f"partial sums over a gloo ring ({init})")
    return GlooCollective(init, a.rank, a.world_size, a.wire, lazy=True)


# ---- engines ---------------------------------------------------------------------------------------
def build_local_engine(
    model: str | Path,
    dtype: str = "fp32",
    window: int | None = None,
    limits: EngineLimits | None = None,
    progress: bool = True,
    memory_budget: int | None = None,
    device: str = "cpu",
    *,
    kv_blocks: int | None = None,
    max_context: int | None = None,
    prefix_cache: bool = True,
    speculative: str = "auto",
    quant: str = "none",
    fast_path: str = "auto",
    decision: GpuDecision | None = None,
    draft_model: str | Path | None = None,
    draft_quant: str = "none",
    act_quant: str = "none",
) -> Engine:
    """A single-node engine over a model name (prepared on first use) or a model directory. Its
    memory splits as a cluster node's does (engine/budget.py); `window` forces the weight window;
    on a CUDA device the forward loop runs the fused add+RMSNorm kernel unless `fast_path` is off
    (`decision`: detection's, default: asked of this machine). `draft_model` (--draft-model):
    speculative decoding's draft model (build_draft). `act_quant`: --act-quant."""
    use_act_quant(act_quant)
    model_dir = resolve_model(str(model), progress=progress)
    cfg = ModelConfig.from_dir(model_dir)
    # first: parsing tokenizer.json takes ~40 MiB for a moment (SmolLM2's), which is then given back
    # before the weights load, so that it does not add to the process's peak
    tokenizer = Tokenizer.from_dir(model_dir)
    heap.trim(collect=False)
    info = select_device(device)
    fast = choose_fast_path(fast_path, detect_for(info, decision), str(info.device))
    cap = device_capacity("local", info, memory_budget, dtype)
    weights = weight_bytes(model_dir, dtype, quant)
    plan = make_plan(cfg, [cap], model_digest(model_dir), weights.layer)
    mem = plan_memory(
        cfg,
        plan.share_of(0),
        cap.memory_bytes,
        dtype,
        budgeted=cap.budgeted,
        is_master=True,
        context=max_context,
        kv_blocks=kv_blocks,
        limits=limits or DEFAULT_LIMITS,
        weights=weights,
    )
    window = mem.window if window is None else window
    runner = open_runner(
        model_dir,
        cfg,
        plan,
        0,
        LocalCollective(fused=fast.kind == "fused"),
        dtype,
        window,
        str(info.device),
        progress,
        kv_blocks=mem.kv_blocks,
        quant=quant,
    )
    # the reorder for oneDNN holds two copies of the lm_head for a moment: not under a budget
    head = ModelHead(
        model_dir,
        cfg,
        torch_dtype(dtype),
        info.device,
        prepacked=memory_budget is None and window is None,
        quant=quant,
    )
    name = Path(model).name if Path(str(model)).exists() else str(model)
    say_memory("local", window, mem.kv_blocks, progress)
    if progress:
        say(fast.summary())
    draft = build_draft(
        draft_model,
        speculative,
        cfg,
        tokenizer,
        head.vocab_size,
        dtype,
        str(info.device),
        draft_quant,
        kv_blocks=kv_blocks,
        max_context=max_context,
        fused=fast.kind == "fused",
        limits=limits,
        progress=progress,
    )
    engine = Engine(
        cfg,
        head,
        tokenizer,
        LocalDriver(runner),
        name,
        limits,
        prefix_cache=prefix_cache,
        max_context=max_context,
        speculative=speculative,
        draft=draft,
    )
    heap.trim()  # what starting freed (kernel timings, the tokenizer's parse) goes back to the kernel
    return engine


def build_draft(
    model: str | Path | None,
    speculative: str,
    target: ModelConfig,
    tokenizer: Tokenizer,
    vocab_rows: int,
    dtype: str,
    device: str,
    quant: str = "none",
    *,
    kv_blocks: int | None = None,
    max_context: int | None = None,
    fused: bool = False,
    limits: EngineLimits | None = None,
    progress: bool = True,
) -> DraftModel | None:
    """The draft model of --speculative draft / auto (`model`: --draft-model; None when not
    given), which the master runs alone on its device in the target's dtype (engine/draft.py): its
    weights resident (--draft-quant quantises float ones), its KV cache --kv-blocks blocks, else
    the pool a node gets without a budget (at most 16k tokens). Both come on top of the master's
    --memory-budget. UserError for --speculative draft without a model, or another tokenizer."""
    if not model:
        if speculative == "draft":
            raise UserError("--speculative draft needs a draft model: --draft-model M")
        return None
    if speculative not in ("auto", "draft"):
        say(f"--draft-model {model} is not used with --speculative {speculative}")
        return None
    model_dir = resolve_model(str(model), progress=progress)
    diff = vocab_difference(tokenizer, Tokenizer.from_dir(model_dir))
    if diff is not None:
        raise UserError(f"--draft-model {model} has another tokenizer than the model it drafts for: {diff}")
    cfg = ModelConfig.from_dir(model_dir)
    info = select_device(device)
    weights = weight_bytes(model_dir, dtype, quant)
    plan = make_plan(cfg, [device_capacity("draft", info, None, dtype)], model_digest(model_dir), weights.layer)
    limits = limits or DEFAULT_LIMITS
    if kv_blocks is None:
        mem = plan_memory(
            cfg, plan.share_of(0), None, dtype, is_master=True, context=max_context, limits=limits, weights=weights
        )
        kv_blocks = mem.kv_blocks
    runner = open_runner(
        model_dir,
        cfg,
        plan,
        0,
        LocalCollective(fused=fused),
        dtype,
        device=device,
        progress=progress,
        kv_blocks=kv_blocks,
        quant=quant,
    )
    head = ModelHead(model_dir, cfg, torch_dtype(dtype), info.device, quant=quant)
    name = Path(model).name if Path(str(model)).exists() else str(model)
    if progress:
        quantised = "" if quant == "none" else f", --draft-quant {quant}"
        say(
            f"draft model {name}{quantised}: {cfg.num_layers} layers resident on {device}, KV cache {kv_blocks} blocks "
            f"({kv_blocks * BLOCK_TOKENS} tokens)"
        )
    eos = set(tokenizer.eos_token_ids) | set(target.eos_token_ids)
    return DraftModel(name, cfg, runner, head, vocab_limit=vocab_rows, stop_ids=eos, limits=limits)


def say_memory(who: str, window: int | None, kv_blocks: int, progress: bool = True) -> None:
    if progress:
        say(
            f"{who}: weights {'resident' if window is None else f'streamed through a window of {window} layers'}, "
            f"KV cache {kv_blocks} blocks ({kv_blocks * BLOCK_TOKENS} tokens)"
        )


@dataclass
class RunningMaster:
    master: ClusterMaster
    engine: Engine
    port: int  # the bound gRPC port
    gpu: str  # what the GPU fast path runs, with its reason (FastPath.summary)

    def stop(self) -> None:
        self.engine.shutdown()
        self.master.stop()


def start_master(
    s: MasterSettings, nodes: int, grpc_port: int, gpus: tuple[int, ...] = (), decision: GpuDecision | None = None
) -> RunningMaster:
    """Open the model, start the gRPC server for `nodes` nodes (this one included). `gpus`: the
    CUDA device of every node when they are local processes on this machine's GPUs (local_gpus,
    this one first): they then sum in one NVLink group. `decision`: detection's (default: asked)."""
    info = select_device(f"cuda:{gpus[0]}" if gpus else s.device)
    dtype = default_dtype(info, s.dtype)
    use_act_quant(s.act_quant)  # this node's; its workers get it with their assignment
    model_dir = resolve_model(s.model)
    cfg = ModelConfig.from_dir(model_dir)
    if s.wire == "int8" and (s.collective != "star" or cfg.hidden_size % 32):
        raise UserError(
            "--wire int8 needs the star collective and a hidden size that is a multiple of 32 "
            f"(here: --collective {s.collective}, hidden size {cfg.hidden_size})"
        )
    me = node_id_for(s, "master")
    cap = capacity_for(me, info, s.memory_budget, dtype, s.speed)
    decision = detect_for(info, decision)
    secured = bool(resolve_token(s.token)) or tls_for(s, "master") is not None
    fast = choose_fast_path(s.fast_path, decision, str(info.device), nodes, gpus, s.collective, secured)
    alone = choose_fast_path(s.fast_path, decision, str(info.device))  # the plans of this node alone
    tokenizer = Tokenizer.from_dir(model_dir)
    draft = build_draft(  # before the gRPC port opens: a draft model refused stops the start
        s.draft_model,
        s.speculative,
        cfg,
        tokenizer,
        cfg.vocab_size,
        dtype,
        str(info.device),
        s.draft_quant,
        kv_blocks=s.kv_blocks,
        max_context=s.max_context,
        fused=alone.kind == "fused",
    )
    star = s.collective == "star" and fast.kind not in GROUP_KINDS
    split_head, head_line = choose_head_split(s.head_split, cfg.vocab_size, cfg.hidden_size, nodes, star)
    # workers reach a gloo group's or an NVLink group's port at the address they dial the master by
    gloo = f"tcp://:{_free_port()}" if s.collective == "gloo" else ""
    if fast.kind in GROUP_KINDS:
        gloo = f"{fast.kind}+tcp://:{_free_port()}"
    spec = ClusterSpec(
        model_dir,
        cfg,
        model_digest(model_dir),
        dtype,
        s.wire,
        str(info.device),
        s.peer_timeout,
        gloo,
        max_context=s.max_context,
        kv_blocks=s.kv_blocks,
        quant=s.quant,
        act_quant=s.act_quant,
        weights=weight_bytes(model_dir, dtype, s.quant),
        cache_size=s.cache_size,
        split_head=split_head,
        admit_busy_after_s=s.admit_busy_after,
    )
    master = ClusterMaster(
        spec,
        cap,
        make_master_collective(spec, alone, s.token_split),
        nodes=nodes,
        token=resolve_token(s.token),
        tls=tls_for(s, "master"),
        auto_admit=s.auto_admit,
    )
    gpu = fast.summary()
    say(gpu)
    if nodes > 1:
        say(token_split_line(s.token_split, fast, s.collective))
    say(head_line)
    host = s.grpc_host or s.host
    port = master.start(f"{host}:{grpc_port}")
    say(f"master {cap.node_id}: workers join at {host}:{port} (waiting for {nodes - 1} more node(s))")
    head = ModelHead(
        model_dir,
        cfg,
        torch_dtype(dtype),
        info.device,
        prepacked=not s.memory_budget,
        quant=s.quant,
        lm_head=not split_head,
    )
    engine = Engine(
        cfg,
        head,
        tokenizer,
        ClusterDriver(master.coordinator),
        Path(s.model).name,
        prefix_cache=not s.no_prefix_cache,
        max_context=s.max_context,
        speculative=s.speculative,
        draft=draft,
    )
    heap.trim()  # what starting freed (kernel timings, the tokenizer's parse) goes back to the kernel
    return RunningMaster(master, engine, port, gpu)
