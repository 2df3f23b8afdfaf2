"""The worker daemon (`tpi-node join`): Join the master, make sure its shard files are in the
local cache (sha256-checked; only missing or corrupt files are fetched, and only the units it
lacks: cluster/shard_fetch.py), open them, then run the layer loop for every Step the master
sends, meeting the master in the collective.

Everything runs on one thread: the gRPC loop is run by this thread whenever it waits (for the
next frame, or for a sum inside a step), so a frame reaches the code with no thread hand-off.

A shard file that fails to load while serving is read again, then fetched again from the master
(weights/store.py ShardRepair); when even that fails the worker reports the error on its session
(the master re-plans around it) and exits. A master that goes away (killed, restarting,
unreachable) is looked for again for up to --master-retry-s (by mDNS when it was found that way);
the worker then joins again, keeping every cached file whose sha256 the new plan still lists.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from tpi_node import __version__, heap
from tpi_node.cluster.assignment import Assignment
from tpi_node.cluster.auth import AuthError
from tpi_node.cluster.join_auth import prove_join_async
from tpi_node.cluster.link import MasterLink
from tpi_node.cluster.sessions import HEARTBEAT_S
from tpi_node.cluster.shard_fetch import fetch, missing_bytes, say  # say: the worker's one log voice
from tpi_node.cluster.tls import TlsFiles
from tpi_node.cluster.unix_session import is_loopback
from tpi_node.comm.codec import FrameError, from_pb
from tpi_node.comm.collective import Collective
from tpi_node.comm.star import PeerLost, SessionEnded, StepAborted
from tpi_node.dtypes import torch_dtype
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.head import VocabShard
from tpi_node.engine.runner import NodeRunner
from tpi_node.engine.vocab import HeadAsk
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.model.qkernel import use_act_quant
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.settings import FIRST_DIAL_S
from tpi_node.weights import cache
from tpi_node.weights.disk import DiskFullError, disk_full
from tpi_node.weights.head_rows import HEAD_FILE
from tpi_node.weights.plan import NodeCapacity
from tpi_node.weights.slicer import shard_dir
from tpi_node.weights.store import ShardError, ShardRepair, ShardStore

# The collective this worker computes with for an assignment (chosen by commands/compose.py).
MakeWorkerCollective = Callable[[Assignment, MasterLink, str], Collective]

# What a worker does when the master ends its session, by ShutdownCode.
EXIT_CODES = {pb.MASTER_STOPPING: 0, pb.REFUSED: 1, pb.MALFORMED_FRAME: 1, pb.SHUTDOWN_UNSPECIFIED: 1}

REDIAL_S = 5.0  # a lost master: each attempt waits this long for a connection (gRPC redials inside)
RETRY_PAUSE_S = (0.5, 4.0)  # pause between attempts that failed fast: first, doubling up to the last


@dataclass(frozen=True)
class WorkerSpec:
    """Who this worker is and what it offers."""

    master: str  # host:port
    node_id: str
    capacity: NodeCapacity
    device: str = "cpu"
    token: str | None = None
    tls: TlsFiles | None = None
    address: str = ""  # how it describes itself (shown in /health)
    expect_model: str = ""
    master_retry_s: float = 0.0  # how long to look for a lost master again (0: exit at once)
    dial_timeout_s: float = FIRST_DIAL_S  # a master never reached yet: give up after this (--dial-timeout)
    rediscover: Callable[[], str] | None = None  # finds the master again (mDNS) -> host:port
    cache_size: int | None = None  # --cache-size: the shard cache's bound (weights/cache.py)
    local_session: bool = True  # --local-session auto: a master dialled over loopback -> its Unix socket


def worker_dir(a: Assignment) -> Path:
    """This worker's slice set: named by what it holds (weights/cache.py), so a master on the same
    machine that sliced this share has it already (every file is still checked by its sha256)."""
    return shard_dir(a.model_digest, a.plan, a.rank, a.shard_dtype, a.shard_quant)


def run_worker(spec: WorkerSpec, make_collective: MakeWorkerCollective) -> int:
    try:
        link = MasterLink(spec.master, timeout_s=spec.dial_timeout_s, tls=spec.tls)
    except PeerLost as e:
        raise UserError(str(e)) from None
    request = pb.JoinRequest(
        version=__version__,
        node_id=spec.node_id,
        capacity=spec.capacity.to_pb(),
        address=spec.address,
        model_digest=spec.expect_model,
    )
    retry = MasterRetry(spec)
    try:
        while True:  # the master re-plans (a node lost or admitted), or was lost: join again
            try:
                code = _join_and_serve(link, spec, request, make_collective, retry)
            except SessionEnded as e:  # ended on purpose in the middle of a step
                say(str(e))
                code = REJOIN if e.code == pb.REJOIN else EXIT_CODES.get(e.code, 1)
            except PeerLost as e:  # the master went away: find it again
                link.close()
                link = None  # (none to close should reconnect give up)
                link = retry.reconnect(str(e))
                continue
            if code is not REJOIN:
                return code
            link.close_session()
    finally:
        if link is not None:
            link.close()


REJOIN = object()


class MasterRetry:
    """Finding a lost master again: every REDIAL_S (with short pauses when an attempt fails
    fast), by mDNS when the master was found that way, until it answers or --master-retry-s
    passed since the worker last served."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.lost_since: float | None = None
        self.master = spec.master  # where the master was last found

    def served(self) -> None:
        """The worker serves again: a later loss gets the whole --master-retry-s."""
        self.lost_since = None

    def reconnect(self, why: str) -> MasterLink:
        s, now = self.spec, time.monotonic()
        if s.master_retry_s <= 0:
            raise UserError(f"{why}; not waiting for it to come back (--master-retry-s 0)")
        self.lost_since = self.lost_since or now
        say(f"{why}; looking for it again for up to {s.master_retry_s:g} s")
        pause = RETRY_PAUSE_S[0]
        while True:
            t0 = time.monotonic()
            try:
                if s.rediscover is not None:
                    self.master = s.rediscover()
                left = s.master_retry_s - (t0 - self.lost_since)
                link = MasterLink(self.master, timeout_s=max(0.5, min(REDIAL_S, left)), tls=s.tls)
                say(f"the master answers at {self.master}")
                return link
            except (PeerLost, UserError, OSError) as e:  # not there yet (DiscoveryError is a UserError)
                waited = time.monotonic() - self.lost_since
                if waited >= s.master_retry_s:
                    raise UserError(f"the master did not come back within {s.master_retry_s:g} s: {e}") from None
                say(f"still waiting for the master ({waited:.0f} s of at most {s.master_retry_s:g} s): {e}")
            if time.monotonic() - t0 < REDIAL_S:  # failed fast: do not spin
                time.sleep(pause)
                pause = min(2 * pause, RETRY_PAUSE_S[1])


def _rpc_failure(e: grpc.aio.AioRpcError, what: str) -> Exception:
    """A failed call to the master: PeerLost when it is unreachable (look for it again), else a
    UserError that says what failed."""
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return PeerLost(f"lost the master at {what}: {e.details()}")
    return UserError(f"the master at {what} failed: {e.code().name}: {e.details()}")


async def _join(link: MasterLink, request: pb.JoinRequest, token: str | None) -> pb.JoinReply:
    try:
        await prove_join_async(link.stub, token, request)
    except AuthError as e:
        raise UserError(f"cannot join the master at {link.address}: {e}") from None
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    return await link.stub.Join(request)  # waits until the master has formed the plan


def _join_and_serve(
    link: MasterLink,
    spec: WorkerSpec,
    request: pb.JoinRequest,
    make_collective: MakeWorkerCollective,
    retry: MasterRetry,
):
    say(f"joining {link.address} as {spec.node_id}")
    try:
        reply = link.run(_join(link, request, spec.token))
    except grpc.aio.AioRpcError as e:
        raise _rpc_failure(e, link.address) from None
    if not reply.accepted:
        raise UserError(f"the master at {link.address} refused this node: {reply.reason}")
    try:
        a = Assignment.from_pb(reply)
    except FrameError as e:
        raise UserError(str(e)) from None
    share = a.share
    out = worker_dir(a)
    cache.hold(out)  # in use until this worker has fetched the set of its next plan
    out.mkdir(parents=True, exist_ok=True)
    cache.label(out, a.model_name)
    (out / "config.json").write_text(a.model_config_json)
    cfg = ModelConfig.from_dir(out)
    say(
        f"rank {a.rank} of {a.world_size}: kv heads {share.kv_start}-{share.kv_end}, "
        f"ffn columns {share.ffn_start}-{share.ffn_end}"
    )
    t0 = time.monotonic()
    try:
        files, nbytes, kept = link.run(fetch(link, a, out, spec.node_id, spec.cache_size))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # re-planned since this Join
            say(f"the plan changed while fetching ({e.details()}); joining again")
            return REJOIN
        raise _rpc_failure(e, link.address) from None
    except (DiskFullError, OSError) as e:
        what = f"rank {a.rank}'s slice"
        full = e if isinstance(e, DiskFullError) else disk_full(e, out, missing_bytes(a, out), what)
        if full is None:
            raise
        for part in out.glob("*.part"):  # what a copy or an assembly left when the disk filled
            part.unlink(missing_ok=True)
        _goodbye(link, a, spec.node_id, str(full))
        raise full from None
    say(f"shards: fetched {files} files, {nbytes} bytes; {kept} files already cached ({time.monotonic() - t0:.1f} s)")
    cache.release_all(but=out)  # the sets of earlier plans (what it cut its new files from)
    cache.make_room(spec.cache_size)
    # the fetch just checked every file's sha256: the store may trust them as they are now
    repair = ShardRepair({f.name: f.sha256 for f in a.files}, lambda name: _refetch(link, a, out, spec.node_id, name))
    # the master split this node's memory from the capacity it reported (engine/budget.py)
    store = ShardStore(out, cfg, share, window=a.window, device=spec.device, repair=repair)
    use_act_quant(a.act_quant)  # the master's --act-quant, before the runner tunes the kernel
    coll = make_collective(a, link, link.address)
    head, ranges = None, None
    td = torch_dtype(a.shard_dtype)
    if a.split_head:  # its lm_head rows (engine/vocab.py)
        head = VocabShard.from_file(out / HEAD_FILE, share.vocab_rows(cfg), td, spec.device, a.window is None)
        ranges = a.plan.vocab_ranges(cfg)
    runner = NodeRunner(cfg, store, share, coll, td, spec.device, a.kv_blocks, head=head, vocab_ranges=ranges)
    heap.trim()  # what opening freed (kernel timings, the fetch's buffers) goes back to the kernel
    say(
        f"memory: {'resident' if a.window is None else f'window {a.window} layers'}, KV cache {a.kv_blocks} "
        f"blocks ({runner.kv.nbytes() / 2**20:.0f} MiB)"
    )
    local = spec.local_session and is_loopback(link.address)  # the master runs on this machine
    hello = pb.Hello(node_id=spec.node_id, plan_digest=a.plan.digest, rank=a.rank, ticket=a.ticket)
    on = link.open_session(hello, reply.session_socket if local else "", a.wire)
    say(f"ready; serving steps from {link.address}; session on {on}")
    retry.served()
    try:
        return _serve(link, runner, cfg)
    finally:
        runner.close()


def _refetch(link: MasterLink, a: Assignment, out: Path, node_id: str, name: str) -> None:
    """The store found `name` unusable: fetch it again from the master unless its sha256 still
    matches (on the thread that owns the link: see ShardRepair). PeerLost when the master is
    gone (the worker looks for it again), ShardError when the master cannot give a good copy."""
    one = dataclasses.replace(a, files=tuple(f for f in a.files if f.name == name))
    try:
        fetched, nbytes, _ = link.run(fetch(link, one, out, node_id))
    except grpc.aio.AioRpcError as e:
        failure = _rpc_failure(e, link.address)
        raise (failure if isinstance(failure, PeerLost) else ShardError(str(failure))) from None
    except (UserError, FrameError) as e:  # e.g. the master's own copy does not match its sha256
        raise ShardError(str(e)) from None
    say(
        f"{name}: replaced with a good copy ({nbytes} bytes from the master)"
        if fetched
        else f"{name}: its sha256 matches; kept"
    )


def _serve(link: MasterLink, runner: NodeRunner, cfg: ModelConfig):
    """Steps until the master ends the session (-> REJOIN or an exit code). PeerLost (the master
    went away) goes up to run_worker, which looks for it again."""
    while True:
        msg = link.run(link.recv(HEARTBEAT_S))
        if msg is None:
            _unless_broken(link, 0, runner.store.repair)  # a file the prefetcher waits for, fetched while idle
            link.run(link.send(pb.WorkerMsg(heartbeat=pb.Heartbeat(time=time.time()))))
            continue
        kind = msg.WhichOneof("kind")
        if kind == "step":
            try:
                _unless_broken(link, msg.step.step_id, lambda: _step(runner, cfg, msg.step))
            except StepAborted as e:
                say(f"step {msg.step.step_id} aborted by the master: {e}")
            except (FrameError, ValueError) as e:
                text = f"malformed frame from the master: {e}"
                _report(link, text, msg.step.step_id)
                raise UserError(text) from None
        elif kind == "shutdown" and msg.shutdown.code == pb.REJOIN:
            say(msg.shutdown.reason)
            return REJOIN
        elif kind == "shutdown":
            say(f"the master ended the session: {msg.shutdown.reason}")
            return EXIT_CODES.get(msg.shutdown.code, 1)


def _unless_broken(link: MasterLink, step_id: int, work: Callable[[], None]) -> None:
    """Run `work`; when this node's weights are unusable even after fetching them again, tell the
    master (it re-plans around this node) and exit with that error."""
    try:
        work()
    except ShardError as e:
        text = f"this node cannot load its slice of the model: {e}"
        _report(link, text, step_id)
        _until_ended(link)
        raise UserError(text) from None


def _until_ended(link: MasterLink) -> None:
    """Wait (at most GOODBYE_S) until the master ends the session, so it reads the Error frame
    before this worker's exit breaks the stream."""
    deadline = time.monotonic() + GOODBYE_S
    try:
        while time.monotonic() < deadline:
            link.run(link.recv(max(0.0, deadline - time.monotonic())))  # frames of the step: skipped
    except PeerLost:  # ended (what we waited for), or the master is gone
        pass


GOODBYE_S = 5.0  # how long a worker that cannot serve waits for the master to read its reason


def _goodbye(link: MasterLink, a: Assignment, node_id: str, text: str) -> None:
    """This worker exits before serving (its disk is full): open its session only to tell the
    master why (it logs the reason and re-plans without this node), then wait until the master
    has ended the session, so the reason is read before the stream goes."""
    say(text)
    try:
        link.open_session(pb.Hello(node_id=node_id, plan_digest=a.plan.digest, rank=a.rank, ticket=a.ticket))
        _report(link, text, 0)
        link.run(link.recv(GOODBYE_S))
    except PeerLost:  # the master ended the session (what we waited for), or is gone
        pass


def _report(link: MasterLink, text: str, step_id: int) -> None:
    """Send an Error frame on the session (the master ends it); a lost master does not matter here."""
    try:
        link.run(link.send(pb.WorkerMsg(error=pb.Error(message=text, step_id=step_id))))
    except PeerLost:
        pass


def _step(runner: NodeRunner, cfg: ModelConfig, step: pb.Step) -> None:
    layout = BatchLayout.from_pb(step.layout)
    x = from_pb(step.hidden, (layout.num_tokens, cfg.hidden_size), what="step hidden states")
    h = runner.forward(layout, x, step.step_id, step.split)  # [T, H]; the master keeps the result
    if step.HasField("head"):  # the split head: this node's candidates go to the master
        runner.vocab_step(h, HeadAsk.from_pb(step.head, layout.num_tokens))
