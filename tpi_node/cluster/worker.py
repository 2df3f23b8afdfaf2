"""The worker daemon (`tpi-node join`): Join the master, make sure its shard files are in the
local cache (sha256-checked; only missing or corrupt files are fetched), open them, then run the
layer loop for every Step the master sends, meeting the master in the collective.

Everything runs on one thread: the gRPC loop is run by this thread whenever it waits (for the
next frame, or for a sum inside a step), so a frame reaches the code with no thread hand-off.

A shard file that fails to load while serving is read again, then fetched again from the master
(weights/store.py ShardRepair); when even that fails the worker reports the error on its session
(the master re-plans around it) and exits. A master that goes away (killed, restarting,
unreachable) is looked for again for up to --master-retry-s (by mDNS when it was found that way);
the worker then joins again, keeping every cached file whose sha256 the new plan still lists.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from safetensors import SafetensorError

from tpi_node import __version__
from tpi_node.cluster.assignment import Assignment
from tpi_node.cluster.auth import AuthError
from tpi_node.cluster.join_auth import prove_join_async
from tpi_node.cluster.link import MasterLink
from tpi_node.cluster.sessions import HEARTBEAT_S
from tpi_node.cluster.tls import TlsFiles
from tpi_node.comm.codec import FrameError, from_pb
from tpi_node.comm.collective import Collective
from tpi_node.comm.star import PeerLost, SessionEnded, StepAborted
from tpi_node.dtypes import torch_dtype
from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.runner import NodeRunner
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.weights import cache
from tpi_node.weights.disk import DiskFullError, check_free, disk_full
from tpi_node.weights.plan import NodeCapacity
from tpi_node.weights.slicer import PartError, Reuse, decode, sha256_file, shard_dir, spans, write_tensors
from tpi_node.weights.store import ShardError, ShardRepair, ShardStore

# The collective this worker computes with for an assignment (chosen by commands/compose.py).
MakeWorkerCollective = Callable[[Assignment, MasterLink, str], Collective]

# A share that grew is assembled as a pipeline: the parts of PARTS_AHEAD layer files are on their
# way (the master cuts the next while it sends one) while ASSEMBLERS threads cut, write and hash
# the files whose parts arrived.
PARTS_AHEAD = 2
ASSEMBLERS = 2

# What a worker does when the master ends its session, by ShutdownCode.
EXIT_CODES = {pb.MASTER_STOPPING: 0, pb.REFUSED: 1, pb.MALFORMED_FRAME: 1, pb.SHUTDOWN_UNSPECIFIED: 1}

FIRST_DIAL_S = 30.0  # a master never reached yet: give up after this (likely a wrong address or TLS)
REDIAL_S = 5.0  # a lost master: each attempt waits this long for a connection (gRPC redials inside)
RETRY_PAUSE_S = (0.5, 4.0)  # pause between attempts that failed fast: first, doubling up to the last


def say(msg: str) -> None:
    print(f"[tpi-node] {msg}", file=sys.stderr, flush=True)


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
    rediscover: Callable[[], str] | None = None  # finds the master again (mDNS) -> host:port
    cache_size: int | None = None  # --cache-size: the shard cache's bound (weights/cache.py)


def worker_dir(a: Assignment) -> Path:
    """This worker's slice set: named by what it holds (weights/cache.py), so a master on the same
    machine that sliced this share has it already (every file is still checked by its sha256)."""
    return shard_dir(a.model_digest, a.plan, a.rank, a.shard_dtype, a.shard_quant)


def run_worker(spec: WorkerSpec, make_collective: MakeWorkerCollective) -> int:
    try:
        link = MasterLink(spec.master, timeout_s=FIRST_DIAL_S, tls=spec.tls)
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
        files, nbytes, kept = link.run(_fetch(link, a, out, spec.node_id, spec.cache_size))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # re-planned since this Join
            say(f"the plan changed while fetching ({e.details()}); joining again")
            return REJOIN
        raise _rpc_failure(e, link.address) from None
    except (DiskFullError, OSError) as e:
        what = f"rank {a.rank}'s slice"
        full = e if isinstance(e, DiskFullError) else disk_full(e, out, _missing_bytes(a, out), what)
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
    coll = make_collective(a, link, link.address)
    runner = NodeRunner(cfg, store, share, coll, torch_dtype(a.shard_dtype), spec.device, a.kv_blocks)
    say(
        f"memory: {'resident' if a.window is None else f'window {a.window} layers'}, KV cache {a.kv_blocks} "
        f"blocks ({runner.kv.nbytes() / 2**20:.0f} MiB)"
    )
    link.open_session(pb.Hello(node_id=spec.node_id, plan_digest=a.plan.digest, rank=a.rank, ticket=a.ticket))
    say(f"ready; serving steps from {link.address}")
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
        fetched, nbytes, _ = link.run(_fetch(link, one, out, node_id))
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


async def _fetch(
    link: MasterLink, a: Assignment, out: Path, node_id: str, cache_size: int | None = None
) -> tuple[int, int, int]:
    """Fetch every manifest file that is missing or whose sha256 differs. -> (files, bytes, kept).

    Only the difference crosses the wire: a layer file whose units a cached set of this model
    holds in part (this node's set of an earlier plan, say, before a lost node's units came to it)
    is assembled from the units cut out of that set's file and the others fetched as parts
    (FetchShard with a unit range; weights/slicer.py Reuse). The result is checked against the
    manifest's sha256 like a fetched file; should it not match, the whole file is fetched."""
    out.mkdir(parents=True, exist_ok=True)
    fetched = nbytes = kept = 0
    todo = []
    for f in a.files:
        path = out / f.name
        if path.is_file() and path.stat().st_size == f.size and sha256_file(path) == f.sha256:
            kept += 1
            continue
        if path.exists():
            say(f"{f.name}: corrupt or stale in the cache, fetching it again")
        todo.append(f)
    if not todo:
        return 0, 0, kept
    cache.make_room(cache_size, sum(f.size for f in todo))
    check_free(out, sum(f.size for f in todo), f"rank {a.rank}'s slice ({len(todo)} files to fetch)")
    sets = cache.donors(a.model_digest, a.shard_dtype, a.shard_quant, but=out)
    leases = [cache.hold(d) for d, *_ in sets]  # nobody evicts them while we cut from them
    total = sum(f.size for f in todo)

    async def done(f, got: int | None, how: str) -> None:
        nonlocal fetched, nbytes
        if got is None:  # could not be assembled, or nothing cached to cut from
            got, how = await _fetch_whole(link, a, f, out / f.name, node_id), "fetched"
        fetched, nbytes = fetched + 1, nbytes + got
        say(f"{f.name}: {how} ({got / 2**20:.1f} MiB; {nbytes / 2**20:.1f} of at most {total / 2**20:.1f} MiB)")

    try:
        cut = []  # (file, Reuse) of the layer files to assemble
        for f in todo:
            reuse = Reuse.plan(f.name, spans(a.share), sets) if f.name.startswith("layer-") else None
            if reuse is not None:
                cut.append((f, reuse))
            else:  # norms (the same in every set of the model), or a layer nothing cached holds
                await done(f, 0 if _copy_same(f, out / f.name, sets) else None, "copied from a cached set")
        await _assemble_all(link, a, out, node_id, cut, done)
    finally:
        for lease in leases:
            lease.release()
    return fetched, nbytes, kept


async def _assemble_all(link: MasterLink, a: Assignment, out: Path, node_id: str, cut: list, done) -> None:
    """The layer files of `cut` ((file, Reuse) each) as a pipeline: the parts of PARTS_AHEAD files
    are on their way while ASSEMBLERS threads cut, write and hash the files whose parts arrived;
    `done(file, bytes fetched, or None when it must be fetched whole, how)` hears of each in order."""
    cfg = ModelConfig.from_dict(json.loads(a.model_config_json))
    loop, pool = asyncio.get_running_loop(), ThreadPoolExecutor(ASSEMBLERS, thread_name_prefix="tpi-assemble")
    queue = iter(cut)
    fetching = deque()  # (file, Reuse, task fetching its parts), in file order
    building = deque()  # (file, bytes of its parts, its assembly on `pool`), in file order

    def top_up() -> None:
        while len(fetching) < PARTS_AHEAD and (nxt := next(queue, None)) is not None:
            fetching.append((*nxt, asyncio.ensure_future(_fetch_parts(link, a, nxt[0].name, node_id, nxt[1]))))

    async def finish() -> None:
        f, got, job = building.popleft()
        await done(f, got if await job else None, "cut from cached units and the parts fetched")

    try:
        top_up()
        while fetching:
            f, reuse, task = fetching.popleft()
            parts = await task
            top_up()
            if len(building) == ASSEMBLERS:
                await finish()
            job = loop.run_in_executor(pool, _assemble, f, out / f.name, cfg, reuse, parts)
            building.append((f, sum(map(len, parts)), job))
        while building:
            await finish()
    finally:
        for *_, task in fetching:
            task.cancel()
        if building:
            await asyncio.wait([job for *_, job in building])  # (they write into `out`: let them end first)
        pool.shutdown()


def _copy_same(f, path: Path, sets) -> bool:
    """Copy file `f` from a cached set that has it with the manifest's sha256. -> copied?"""
    for d, *_ in sets:
        src = d / f.name
        if src.is_file() and src.stat().st_size == f.size and sha256_file(src) == f.sha256:
            tmp = path.with_suffix(".part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
            return True
    return False


async def _fetch_whole(link: MasterLink, a: Assignment, f, path: Path, node_id: str) -> int:
    """One manifest file, whole, into `path` (sha256 checked). -> bytes received."""
    nbytes = 0
    tmp, h = path.with_suffix(".part"), hashlib.sha256()
    req = pb.ShardRequest(node_id=node_id, plan_digest=a.plan.digest, rank=a.rank, name=f.name, ticket=a.ticket)
    try:
        with open(tmp, "wb") as fh:
            async for chunk in link.stub.FetchShard(req):
                if chunk.offset != fh.tell():
                    raise FrameError(f"{f.name}: chunk at offset {chunk.offset}, expected {fh.tell()}")
                fh.write(chunk.data)
                h.update(chunk.data)
                nbytes += len(chunk.data)
    except BaseException:  # a full disk, a lost master: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        raise
    if h.hexdigest() != f.sha256 or tmp.stat().st_size != f.size:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{f.name} from the master does not match its sha256; the master's cache is corrupt")
    os.replace(tmp, path)
    return nbytes


def _assemble(f, path: Path, cfg: ModelConfig, reuse: Reuse, parts: list[bytearray]) -> bool:
    """`path` from cached units and the fetched parts around them (on the assembly thread).
    False when the result is not the manifest's file (then nothing is left behind)."""
    tmp = path.with_suffix(".part")
    try:
        sha = write_tensors(tmp, reuse.assemble(f.name, cfg, *map(decode, parts)))
    except (PartError, SafetensorError, FileNotFoundError) as e:
        tmp.unlink(missing_ok=True)
        say(f"{f.name}: cannot cut it from the cached slices ({e}); fetching it whole")
        return False
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sha != f.sha256 or tmp.stat().st_size != f.size:
        tmp.unlink(missing_ok=True)
        say(f"{f.name}: assembled from the cached slices it does not match its sha256; fetching it whole")
        return False
    os.replace(tmp, path)
    return True


async def _fetch_parts(link: MasterLink, a: Assignment, name: str, node_id: str, reuse: Reuse) -> list[bytearray]:
    """The units of layer file `name` before and after those cut from the cache."""
    return [await _fetch_part(link, a, name, node_id, span) for span in (reuse.before, reuse.after)]


async def _fetch_part(link: MasterLink, a: Assignment, name: str, node_id: str, span) -> bytearray:
    """Units (kv, ffn) of this rank's layer file `name`, as the master cuts them (none: empty)."""
    if span is None:
        return bytearray()
    (kv0, kv1), (f0, f1) = span
    req = pb.ShardRequest(
        node_id=node_id,
        plan_digest=a.plan.digest,
        rank=a.rank,
        name=name,
        ticket=a.ticket,
        part=True,
        kv_start=kv0,
        kv_end=kv1,
        ffn_start=f0,
        ffn_end=f1,
    )
    buf = bytearray()
    async for chunk in link.stub.FetchShard(req):
        if chunk.offset != len(buf):
            raise FrameError(f"{name}: chunk at offset {chunk.offset}, expected {len(buf)}")
        buf += chunk.data
    return buf


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


def _missing_bytes(a: Assignment, out: Path) -> int:
    """Bytes of the manifest's files not (fully) in the cache yet: what the slice still needs."""
    return sum(f.size for f in a.files if not ((out / f.name).is_file() and (out / f.name).stat().st_size == f.size))


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
    runner.forward(layout, x, step.step_id, step.split)  # [T, H]; the master keeps the result
