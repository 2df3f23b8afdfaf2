"""Allreduce latency on loopback: the gRPC star (tpi_node.comm.star, over the sessions of
tpi_node.cluster) next to torch.distributed gloo all_reduce, same payloads (hidden 576 x 1, 16, 256
tokens), 2, 3 and 4 real processes.

    python scripts/bench_allreduce.py [--iters 400] [--worlds 2 3 4] [--tokens 1 16 256] [--wire fp32]

Prints one table: median and p90 per allreduce in microseconds, measured on rank 0 (the master),
and the ratio star / gloo (goal: <= 0.5 at one token).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN = 576


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_calls(coll, tokens: int, iters: int, rank: int) -> list[float]:
    import torch

    t = torch.randn(tokens, HIDDEN) * (rank + 1)
    warm = max(20, iters // 10)
    out = []
    for i in range(warm + iters):
        if hasattr(coll, "begin_step") and i % 60 == 0:
            coll.begin_step(i // 60)  # a "step" of 30 layers = 60 allreduces
        t0 = time.perf_counter()
        coll.allreduce(t)
        if i >= warm:
            out.append(time.perf_counter() - t0)
    return out


def star_rank(rank: int, world: int, port: int, tokens: int, iters: int, wire: str, q) -> None:
    import torch

    torch.set_num_threads(1)
    from tpi_node.cluster.link import join_star
    from tpi_node.cluster.star_server import StarServer
    from tpi_node.comm.star import PeerLost

    if rank == 0:
        server = StarServer(world, f"127.0.0.1:{port}", wire)
        server.wait_for_peers()
        q.put(_time_calls(server.hub, tokens, iters, rank))
        server.shared.run(__import__("asyncio").sleep(0.2))  # let the last sums leave
    else:
        deadline = time.monotonic() + 20
        while True:
            try:
                spoke = join_star(f"127.0.0.1:{port}", rank, world, wire)
                break
            except PeerLost:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        _time_calls(spoke, tokens, iters, rank)
        spoke.link.close()


def gloo_rank(rank: int, world: int, port: int, tokens: int, iters: int, wire: str, q) -> None:
    import torch

    torch.set_num_threads(1)
    from tpi_node.comm.torch_dist import GlooCollective

    coll = GlooCollective(f"tcp://127.0.0.1:{port}", rank, world, wire)
    times = _time_calls(coll, tokens, iters, rank)
    if rank == 0:
        q.put(times)
    coll.close()


def measure(target, world: int, tokens: int, iters: int, wire: str) -> list[float]:
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, tokens, iters, wire, q)) for r in range(world)]
    for p in procs:
        p.start()
    times = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return sorted(times)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "fp16", "int8"])
    a = ap.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}, wire {a.wire}, {a.iters} calls"
    )
    print(
        f"{'procs':>5} {'tokens':>6} | {'star med':>9} {'star p90':>9} | {'gloo med':>9} {'gloo p90':>9} | {'ratio':>5}"
    )
    for world in a.worlds:
        for tokens in a.tokens:
            iters = a.iters if tokens < 256 else max(50, a.iters // 4)
            s = measure(star_rank, world, tokens, iters, a.wire)
            g = measure(gloo_rank, world, tokens, iters, a.wire)
            print(
                f"{world:>5} {tokens:>6} | {pct(s, 0.5):>9.0f} {pct(s, 0.9):>9.0f} | {pct(g, 0.5):>9.0f} "
                f"{pct(g, 0.9):>9.0f} | {pct(s, 0.5) / pct(g, 0.5):>5.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
