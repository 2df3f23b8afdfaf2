"""Allreduce latency on loopback: the gRPC star (tpi_node.comm.star, over the sessions of
tpi_node.cluster), the same star with its sessions on a Unix socket (`unix`: what workers on the
master's machine use, cluster/unix_session.py) and torch.distributed gloo all_reduce, same
payloads (hidden 576 x 1, 16, 256 tokens), 2, 3 and 4 real processes.

    python scripts/bench_allreduce.py [--iters 400] [--worlds 2 3 4] [--tokens 1 16 256] [--wire fp32]
         [--collectives star unix gloo] [--before DIR] [--breakdown] [--compute-us 0]

Prints one table: median and p90 per allreduce in microseconds, measured on rank 0 (the master),
and the ratio star / gloo (goal: <= 0.5 at one token). --before DIR also times the star of another
source tree (e.g. `git archive HEAD | tar -x -C DIR`, with tpi_node/proto copied in), alternating
with this one, for a before/after column. --breakdown prints where one round trip's time goes (2
processes, 1 token): a timeline from timestamps taken in both processes (CLOCK_MONOTONIC is shared),
next to the floor of the same gRPC stream echoing prebuilt frames (no torch, no codec, no hub).
--compute-us N: every rank computes for N us before each allreduce (the forward loop's shape), and
the times include it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN = 576


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_calls(coll, tokens: int, iters: int, rank: int, compute_us: int = 0) -> list[float]:
    """Per allreduce: seconds from the call to its return, or with --compute-us, from the start of
    the compute before it (every rank computes, as the forward loop does between allreduces)."""
    import torch

    t = torch.randn(tokens, HIDDEN) * (rank + 1)
    w = torch.randn(HIDDEN, HIDDEN)
    warm = max(20, iters // 10)
    out = []
    for i in range(warm + iters):
        if hasattr(coll, "begin_step") and i % 60 == 0:
            coll.begin_step(i // 60)  # a "step" of 30 layers = 60 allreduces
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < compute_us * 1e-6:
            t @ w
        coll.allreduce(t)
        if i >= warm:
            out.append(time.perf_counter() - t0)
    return out


def star_rank(
    rank: int, world: int, port: int, tokens: int, iters: int, wire: str, q, compute_us=0, src="", unix_dir=""
) -> None:
    if src:  # another source tree's star (--before)
        sys.path.insert(0, src)
    import torch

    torch.set_num_threads(1)
    from tpi_node.cluster.link import join_star
    from tpi_node.cluster.star_server import StarServer
    from tpi_node.comm.star import PeerLost

    if rank == 0:
        server = StarServer(world, f"127.0.0.1:{port}", wire, unix_dir=unix_dir)
        server.wait_for_peers()
        q.put(_time_calls(server.hub, tokens, iters, rank, compute_us))
        server.shared.run(__import__("asyncio").sleep(0.2))  # let the last sums leave
    else:
        deadline = time.monotonic() + 20
        while True:
            try:
                path = os.path.join(unix_dir, "session.sock") if unix_dir else ""
                if path and not os.path.exists(path):
                    raise PeerLost("not listening yet")
                spoke = join_star(f"127.0.0.1:{port}", rank, world, wire, unix_path=path)
                break
            except PeerLost:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        _time_calls(spoke, tokens, iters, rank, compute_us)
        spoke.link.close()


def gloo_rank(rank: int, world: int, port: int, tokens: int, iters: int, wire: str, q, compute_us=0) -> None:
    import torch

    torch.set_num_threads(1)
    from tpi_node.comm.torch_dist import GlooCollective

    coll = GlooCollective(f"tcp://127.0.0.1:{port}", rank, world, wire)
    times = _time_calls(coll, tokens, iters, rank, compute_us)
    if rank == 0:
        q.put(times)
    coll.close()


def measure(target, world: int, tokens: int, iters: int, wire: str, *extra) -> list[float]:
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, tokens, iters, wire, q, *extra)) for r in range(world)]
    for p in procs:
        p.start()
    times = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return sorted(times)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e6


# ---------------------------------------------------------------- --breakdown
def timeline_rank(rank: int, port: int, iters: int, q, src: str = "") -> None:
    """One of 2 ranks of 1-token star allreduces, stamping each one's milestones (perf_counter)."""
    if src:
        sys.path.insert(0, src)
    import asyncio

    import torch

    torch.set_num_threads(1)
    t, marks, rows = torch.randn(1, HIDDEN), {}, []
    if rank == 0:
        from tpi_node.cluster.star_server import StarServer

        server = StarServer(2, f"127.0.0.1:{port}")
        coll, sessions = server.hub, server.sessions
        deliver, send = coll.deliver, sessions.send

        def delivered(r, partial):
            marks["in"] = time.perf_counter()
            deliver(r, partial)

        async def sending(r, msg):
            marks["out"] = time.perf_counter()
            await send(r, msg)

        coll.deliver, sessions.send = delivered, sending
        server.wait_for_peers()
    else:
        from tpi_node.cluster.link import join_star

        coll = join_star(f"127.0.0.1:{port}", 1, 2)
        send, recv = coll.link.send, coll.link.recv

        async def sending(msg):
            marks["out"] = time.perf_counter()
            await send(msg)

        async def received(timeout):
            msg = await recv(timeout)
            marks["in"] = time.perf_counter()
            return msg

        coll.link.send, coll.link.recv = sending, received
    cpu0 = time.process_time(), time.thread_time()
    for i in range(iters):
        if i % 60 == 0:
            coll.begin_step(i // 60)
        t0 = time.perf_counter()
        coll.allreduce(t)
        rows.append((t0, marks["in"], marks["out"], time.perf_counter()))
    q.put((rank, rows, _cpu_per_call(cpu0, iters)))
    if rank == 0:
        server.shared.run(asyncio.sleep(0.3))  # let the last sum leave
    else:
        time.sleep(0.5)
        coll.link.close()


def echo_floor(port: int, iters: int, q) -> None:
    """The worker end of the floor: write a prebuilt 1-token Partial frame, read the echo."""
    from tpi_node.cluster.link import MasterLink
    from tpi_node.proto import tpi_pb2 as pb

    link = MasterLink(f"127.0.0.1:{port}")
    link.open_session(pb.Hello(node_id="floor", rank=1))
    msg = pb.WorkerMsg(
        partial=pb.Partial(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1, HIDDEN], data=bytes(4 * HIDDEN)))
    )

    async def round_trip():
        await link.send(msg)
        await link.recv(5.0)

    times, cpu0 = [], (time.process_time(), time.thread_time())
    for _ in range(iters):
        t0 = time.perf_counter()
        link.run(round_trip())
        times.append(time.perf_counter() - t0)
    q.put((times, _cpu_per_call(cpu0, iters)))
    link.close()


def _cpu_per_call(since: tuple[float, float], calls: int) -> tuple[float, float]:
    """CPU seconds per call since `since`: the whole process (gRPC's threads too), its main thread."""
    return (time.process_time() - since[0]) / calls, (time.thread_time() - since[1]) / calls


def echo_server(port: int, ready) -> None:

    import grpc

    from tpi_node.cluster.channels import listen, new_server
    from tpi_node.comm.loop import new_event_loop
    from tpi_node.proto import tpi_pb2 as pb
    from tpi_node.proto import tpi_pb2_grpc as rpc

    reply = pb.MasterMsg(
        reduced=pb.Reduced(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1, HIDDEN], data=bytes(4 * HIDDEN)))
    )

    class Echo(rpc.MasterServicer):
        async def Session(self, request_iterator, context):
            while (await context.read()) is not grpc.aio.EOF:
                await context.write(reply)

    async def serve():
        server = new_server()
        rpc.add_MasterServicer_to_server(Echo(), server)
        listen(server, f"127.0.0.1:{port}", None)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    new_event_loop().run_until_complete(serve())


def timeline(iters: int, src: str) -> tuple[list, list, dict]:
    """Each allreduce's (call, frame in, frame out, return) on the master and on the worker, and
    each rank's CPU per allreduce."""
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=timeline_rank, args=(r, port, iters, q, src)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {rank: (rows, cpu) for rank, rows, cpu in (q.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    skip = max(20, iters // 10)
    return got[0][0][skip:], got[1][0][skip:], {rank: cpu for rank, (_, cpu) in got.items()}


def floor(iters: int) -> tuple[list[float], tuple[float, float]]:
    ctx = mp.get_context("spawn")
    q, ready, port = ctx.Queue(), ctx.Event(), free_port()
    server = ctx.Process(target=echo_server, args=(port, ready), daemon=True)
    server.start()
    ready.wait(60)
    client = ctx.Process(target=echo_floor, args=(port, iters, q))
    client.start()
    times, cpu = q.get(timeout=300)
    client.join(timeout=60)
    server.kill()
    return times[max(20, iters // 10) :], cpu


def breakdown(iters: int, trees: dict[str, str]) -> None:
    def med(xs) -> float:
        return sorted(xs)[len(xs) // 2] * 1e6

    parts = {
        "worker: call -> partial handed to gRPC (encode, a loop turn)": lambda m, w, c: [x[2] - x[0] for x in w],
        "hop worker -> master: gRPC, kernel, wake-ups, up to deliver()": lambda m, w, c: [
            b[1] - a[2] for a, b in zip(w, m)
        ],
        "master: partial in -> sum handed to gRPC (wake, add, encode)": lambda m, w, c: [x[2] - x[1] for x in m],
        "hop master -> worker: gRPC, kernel, wake-ups, up to recv()": lambda m, w, c: [
            a[1] - b[2] for a, b in zip(w, m)
        ],
        "worker: sum in -> allreduce returns (decode, loop stops)": lambda m, w, c: [x[3] - x[1] for x in w],
        "one allreduce, worker's call to call": lambda m, w, c: [b[0] - a[0] for a, b in zip(w, w[1:])],
        "CPU per allreduce, master process (all threads)": lambda m, w, c: [c[0][0]],
        "CPU per allreduce, master's main thread": lambda m, w, c: [c[0][1]],
        "CPU per allreduce, worker process (all threads)": lambda m, w, c: [c[1][0]],
        "CPU per allreduce, worker's main thread": lambda m, w, c: [c[1][1]],
    }
    got = {name: timeline(iters, src) for name, src in trees.items()}  # one after the other
    print(f"# where one star round trip goes: 2 processes, 1 token (576 fp32), {iters} calls, median us")
    print(f"{'':<66}" + "".join(f"{name:>9}" for name in trees))
    for what, part in parts.items():
        print(f"{what:<66}" + "".join(f"{med(part(*got[name])):>9.0f}" for name in trees))
    times, (cpu, main) = floor(iters)
    print(f"{'floor: the same gRPC stream echoing prebuilt frames (a round trip)':<66}{med(times):>9.0f}")
    print(f"{'floor: CPU per round trip, echo client process (main thread)':<66}{cpu * 1e6:>9.0f} ({main * 1e6:.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    ap.add_argument("--collectives", nargs="+", default=["star", "unix", "gloo"], choices=["star", "unix", "gloo"])
    ap.add_argument("--before", type=Path, default=None, metavar="DIR", help="another source tree's star, beside")
    ap.add_argument("--breakdown", action="store_true", help="where one round trip goes (2 processes, 1 token)")
    ap.add_argument("--compute-us", type=int, default=0, help="matmuls on every rank before each allreduce (us)")
    a = ap.parse_args()
    load = os.getloadavg()
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, python {platform.python_version()}, "
        f"wire {a.wire}, {a.iters} calls" + (f", {a.compute_us} us of compute before each" if a.compute_us else "")
    )
    trees = {"star": ""} | ({"before": str(a.before.resolve())} if a.before else {})
    if a.breakdown:
        return breakdown(a.iters, trees)
    cols = [c for c in trees if "star" in a.collectives] + [c for c in ("unix", "gloo") if c in a.collectives]
    head = " | ".join(f"{c + ' med':>11} {c + ' p90':>11}" for c in cols)
    ratios = (["star/before"] if len(trees) > 1 and "star" in a.collectives else []) + [
        r for r in ("star/gloo", "unix/star") if set(r.split("/")) <= set(cols)
    ]
    print(f"{'procs':>5} {'tokens':>6} | {head} | {' '.join(f'{r:>11}' for r in ratios)}")
    for world in a.worlds:
        for tokens in a.tokens:
            iters = a.iters if tokens < 256 else max(50, a.iters // 4)
            got = {}
            for c in cols:  # one after the other, at the same moment of the machine's load
                if c == "gloo":
                    got[c] = measure(gloo_rank, world, tokens, iters, a.wire, a.compute_us)
                elif c == "unix":
                    with tempfile.TemporaryDirectory() as d:
                        got[c] = measure(star_rank, world, tokens, iters, a.wire, a.compute_us, "", d)
                else:
                    got[c] = measure(star_rank, world, tokens, iters, a.wire, a.compute_us, trees[c])
            cells = " | ".join(f"{pct(got[c], 0.5):>11.0f} {pct(got[c], 0.9):>11.0f}" for c in cols)
            rs = [pct(got[r.split("/")[0]], 0.5) / pct(got[r.split("/")[1]], 0.5) for r in ratios]
            print(f"{world:>5} {tokens:>6} | {cells} | {' '.join(f'{r:>11.2f}' for r in rs)}", flush=True)


if __name__ == "__main__":
    main()
