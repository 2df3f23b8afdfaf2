"""Bringing a worker's slice set up to its manifest (`tpi-node join`): every file that is missing
or whose sha256 differs is fetched from the master, and only the difference crosses the wire: a
layer file whose units a cached set of the model holds in part is cut from it and the rest fetched
as parts (FetchShard with a unit range, weights/slicer.py Reuse).

    files, nbytes, kept = link.run(fetch(link, assignment, out, node_id, cache_size))
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors import SafetensorError

from tpi_node.cluster.assignment import Assignment
from tpi_node.cluster.link import MasterLink
from tpi_node.comm.codec import FrameError
from tpi_node.errors import UserError
from tpi_node.model.config import ModelConfig
from tpi_node.proto import tpi_pb2 as pb
from tpi_node.weights import cache
from tpi_node.weights.disk import check_free
from tpi_node.weights.slicer import PartError, Reuse, decode, sha256_file, spans, write_tensors

# A share that grew is assembled as a pipeline: the parts of PARTS_AHEAD layer files are on their
# way (the master cuts the next while it sends one) while ASSEMBLERS threads cut, write and hash
# the files whose parts arrived.
PARTS_AHEAD = 2
ASSEMBLERS = 2


def say(msg: str) -> None:
    print(f"[tpi-node] {msg}", file=sys.stderr, flush=True)


async def fetch(
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


def missing_bytes(a: Assignment, out: Path) -> int:
    """Bytes of the manifest's files not (fully) in the cache yet: what the slice still needs."""
    return sum(f.size for f in a.files if not ((out / f.name).is_file() and (out / f.name).stat().st_size == f.size))
