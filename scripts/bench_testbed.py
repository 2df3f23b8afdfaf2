"""Distributed latency on the namespace testbed: the gRPC star next to the gloo ring, at 1, 2 and 4
nodes and 0, 1 and 5 ms link latency, beside the TPI-LLM cost model. Needs root.

    sudo .venv/bin/python scripts/bench_testbed.py [--nodes 1 2 4] [--latency 0 1 5]
         [--collectives star gloo] [--rate 300mbit] [--tokens 8] [--iters 60] [--plots docs]

Two parts, one run, every process a real one inside its own namespace (its own link shaped by tc
tbf at --rate and the delay relay at the latency):
  A. allreduce: the Collective classes the engine uses (StarHub/StarSpoke over gRPC, GlooCollective
     over torch.distributed), one token of hidden states (576 fp32), median per call on rank 0.
  B. end to end: `tpi-node serve` + `tpi-node join` on the testbed serving SmolLM2; a streaming
     greedy completion from inside the master's node: TTFT and time per output token.
Cost model (TPI-LLM): a token runs 2 allreduces per layer; a star allreduce crosses 2 links, a ring
allreduce takes 2(N-1) steps, each one link latency L. Predicted = measured at 0 ms + the added
latency: allreduce + steps * L; per token + 2 * layers * steps * L. The 0 ms row keeps the delay
relay in the path (at zero delay), so its small cost is in the baseline and not in the difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN = 576
NAME, SUBNET = "tpibench", "10.231.9.0/24"
AR_PORT, HTTP_PORT, GRPC_PORT = 29511, 8000, 50051


# ---------------------------------------------------------------- processes inside the nodes
def rank_main(a) -> None:
    """One rank of the allreduce benchmark (runs inside a node); rank 0 prints its timings."""
    import torch

    torch.set_num_threads(1)
    x = torch.randn(a.ar_tokens, HIDDEN) * (a.rank + 1)  # [tokens, hidden] partial sums
    if a.coll == "star":
        from tpi_node.cluster.link import join_star
        from tpi_node.cluster.star_server import StarServer
        from tpi_node.comm.star import PeerLost

        if a.rank == 0:
            server = StarServer(a.world, f"0.0.0.0:{a.port}", a.wire)
            server.wait_for_peers(timeout_s=60)
            coll = server.hub
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    coll = join_star(f"{a.addr}:{a.port}", a.rank, a.world, a.wire)
                    break
                except PeerLost:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
    else:
        from tpi_node.comm.torch_dist import GlooCollective

        coll = GlooCollective(f"tcp://{a.addr}:{a.port}", a.rank, a.world, "fp32", timeout_s=60)
    times = []
    warm = 10
    for i in range(warm + a.iters):
        if hasattr(coll, "begin_step") and i % 60 == 0:
            coll.begin_step(i // 60)
        t0 = time.perf_counter()
        coll.allreduce(x)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    if a.rank == 0:
        print(json.dumps({"times": times}), flush=True)
    if a.coll == "star":
        if a.rank == 0:
            coll.shared.run(__import__("asyncio").sleep(0.3))  # let the last sums leave
        else:
            coll.link.close()
    else:
        coll.close()


def client_main(a) -> None:
    """Streaming greedy completions from inside the master's node: TTFT and time per token."""
    with urllib.request.urlopen(a.url + "/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    results = []
    for _ in range(a.repeat):
        body = json.dumps(
            {
                "model": model,
                "prompt": a.prompt,
                "max_tokens": a.tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
        ).encode()
        req = urllib.request.Request(a.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        stamps = []
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
                        stamps.append(time.perf_counter())
        if len(stamps) < 2:
            raise SystemExit(f"only {len(stamps)} tokens streamed")
        results.append(
            {"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "tokens": len(stamps)}
        )
    # The best of the repeats: the testbed shares its cores with everything else on the host.
    print(json.dumps({k: min(r[k] for r in results) for k in ("ttft", "tpot", "tokens")}), flush=True)


# ---------------------------------------------------------------- the driver (host)
def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def steps(coll: str, n: int) -> int:
    """Link traversals on the critical path of one allreduce (TPI-LLM's model)."""
    if n == 1:
        return 0
    return 2 if coll == "star" else 2 * (n - 1)


def bench_allreduce(tb, n: int, coll: str, latency: float, iters: int, wire: str = "fp32", tokens: int = 1) -> float:
    """Median seconds per allreduce of `tokens` rows at this latency (fresh processes)."""
    tb.set_link(latency_ms=latency)
    master_ip = tb.resolve("n0").ip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(REPO)}
    procs = []
    log = tempfile.TemporaryFile(mode="w+")  # ranks' warnings (c10d retries), shown on failure
    for r in range(n):
        argv = [
            sys.executable,
            __file__,
            "--_rank",
            coll,
            "--rank",
            str(r),
            "--world",
            str(n),
            "--addr",
            master_ip,
            "--port",
            str(AR_PORT),
            "--iters",
            str(iters),
            "--wire",
            wire,
            "--ar-tokens",
            str(tokens),
        ]
        procs.append(
            subprocess.Popen(
                tb.command(f"n{r}", argv),
                env=env,
                text=True,
                stderr=log,
                stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
            )
        )
    try:
        out, _ = procs[0].communicate(timeout=300)
        for p in procs[1:]:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if procs[0].returncode != 0:
        log.seek(0)
        raise RuntimeError(f"{coll} allreduce at N={n}, {latency} ms failed:\n{log.read()[-3000:]}")
    return median(json.loads(out.strip().splitlines()[-1])["times"])


def cluster_supports_gloo() -> bool:
    from tpi_node.testbed.cluster import tpi_node_argv

    out = subprocess.run([*tpi_node_argv(), "serve", "--help"], capture_output=True, text=True).stdout
    return "--collective" in out


def bench_e2e(tb, n: int, coll: str, latencies: list[float], a, home: Path) -> dict[float, dict]:
    """TTFT and time per token through the API, one cluster, the latencies changed live."""
    from tpi_node.testbed.cluster import TestbedCluster

    extra = ("--speed", "1")  # even split: the plan follows capacity only
    serve_args = extra + (("--collective", coll) if coll != "star" else ())
    tb.set_link(latency_ms=0)
    out = {}
    with TestbedCluster(
        tb,
        a.model_dir,
        nodes=n,
        home_root=home / f"{coll}-{n}",
        serve_args=serve_args,
        join_args=extra,
        env={"GLOO_SOCKET_IFNAME": "eth0"},
    ) as c:
        for lat in latencies:
            tb.set_link(latency_ms=lat)
            argv = [
                sys.executable,
                __file__,
                "--_client",
                f"http://127.0.0.1:{HTTP_PORT}",
                "--tokens",
                str(a.tokens),
                "--repeat",
                str(a.repeat),
            ]
            r = subprocess.run(
                tb.command("n0", argv),
                capture_output=True,
                text=True,
                timeout=900,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            if r.returncode != 0:
                raise RuntimeError(f"client failed: {r.stderr[-500:]}\n{c.log('n0')}")
            out[lat] = json.loads(r.stdout.strip().splitlines()[-1])
            print(
                f"#   e2e {coll} N={n} L={lat:g} ms: ttft {out[lat]['ttft'] * 1e3:.0f} ms, "
                f"{out[lat]['tpot'] * 1e3:.1f} ms/token",
                file=sys.stderr,
                flush=True,
            )
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}"


def plots(
    res_e2e: dict, res_ar: dict, nodes: list[int], lats: list[float], colls: list[str], layers: int, outdir: Path
) -> list[Path]:
    """Two figures, each with the end-to-end token latency (left) and one allreduce (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"star": "tab:blue", "gloo": "tab:red"}
    styles = ["-", "--", ":", "-."]
    label = {"star": "star (gRPC)", "gloo": "ring (gloo)"}
    made = []

    # Latency vs nodes: one line per collective and link latency.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for coll in colls:
        for lat, style in zip(lats, styles):
            xs = [n for n in nodes if (coll, n) in res_e2e]
            if len(xs) > 1:
                ax1.plot(
                    xs,
                    [res_e2e[(coll, n)][lat]["tpot"] * 1e3 for n in xs],
                    style,
                    marker="o",
                    color=colors[coll],
                    label=f"{label[coll]}, {lat:g} ms",
                )
            xs = [n for n in nodes if (coll, n, lat) in res_ar]
            if xs:
                ax2.plot(
                    xs,
                    [res_ar[(coll, n, lat)] * 1e3 for n in xs],
                    style,
                    marker="o",
                    color=colors[coll],
                    label=f"{label[coll]}, {lat:g} ms",
                )
    ax1.set(
        xlabel="nodes",
        ylabel="ms per output token",
        xticks=nodes,
        title=f"SmolLM2-135M through the API ({layers} layers)",
    )
    ax2.set(
        xlabel="nodes",
        ylabel="ms per allreduce",
        xticks=[n for n in nodes if n > 1],
        title="one allreduce (1 token, 576 fp32)",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(outdir / "testbed_latency_vs_nodes.png")
    fig.savefig(made[-1], dpi=110)

    # Latency vs link latency at the largest N: measured (solid) and the cost model (dashed).
    n = max(nodes)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for coll in colls:
        if (coll, n) in res_e2e:
            r = res_e2e[(coll, n)]
            ax1.plot(
                lats, [r[lat]["tpot"] * 1e3 for lat in lats], "-o", color=colors[coll], label=f"{label[coll]} measured"
            )
            ax1.plot(
                lats,
                [(r[lats[0]]["tpot"] + 2 * layers * steps(coll, n) * (lat - lats[0]) / 1e3) * 1e3 for lat in lats],
                "--",
                color=colors[coll],
                alpha=0.6,
                label=f"{label[coll]} cost model",
            )
        if all((coll, n, lat) in res_ar for lat in lats):
            base = res_ar[(coll, n, lats[0])]
            ax2.plot(
                lats,
                [res_ar[(coll, n, lat)] * 1e3 for lat in lats],
                "-o",
                color=colors[coll],
                label=f"{label[coll]} measured",
            )
            ax2.plot(
                lats,
                [(base + steps(coll, n) * (lat - lats[0]) / 1e3) * 1e3 for lat in lats],
                "--",
                color=colors[coll],
                alpha=0.6,
                label=f"{label[coll]} cost model ({steps(coll, n)} x L)",
            )
    ax1.set(xlabel="link latency L (ms, one way)", ylabel="ms per output token", title=f"token latency, {n} nodes")
    ax2.set(xlabel="link latency L (ms, one way)", ylabel="ms per allreduce", title=f"one allreduce, {n} nodes")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(outdir / "testbed_latency_vs_link.png")
    fig.savefig(made[-1], dpi=110)
    plt.close("all")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--latency", type=float, nargs="+", default=[0.0, 1.0, 5.0])
    ap.add_argument("--collectives", nargs="+", default=["star", "gloo"], choices=["star", "gloo"])
    ap.add_argument("--rate", default="300mbit")
    ap.add_argument("--tokens", type=int, default=12, help="output tokens per completion")
    ap.add_argument("--iters", type=int, default=60, help="allreduce calls per point")
    ap.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "fp16", "int8"], help="part A's star wire")
    ap.add_argument("--ar-tokens", type=int, default=1, help="rows of hidden states per allreduce in part A")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--plots", type=Path, default=REPO / "docs")
    ap.add_argument(
        "--save", type=Path, default=REPO / "docs" / "testbed_results.json", help="raw results (JSON) for --report"
    )
    ap.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the tables and draw the plots of a saved run, measure nothing",
    )
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-allreduce", action="store_true")
    # internal: the processes started inside the nodes
    ap.add_argument("--_rank", dest="rank_coll", default=None)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--addr", default="")
    ap.add_argument("--port", type=int, default=AR_PORT)
    ap.add_argument("--_client", dest="client_url", default=None)
    ap.add_argument("--repeat", type=int, default=2, help="completions per point (the best is kept)")
    ap.add_argument("--prompt", default="The history of the bicycle begins in")
    a = ap.parse_args()
    if a.rank_coll:
        a.coll = a.rank_coll
        return rank_main(a)
    if a.client_url:
        a.url = a.client_url
        return client_main(a)
    if a.report:
        data = json.loads(a.report.read_text())
        for line in data["header"]:
            print(f"# {line}")
        return report(data, a.plots)

    from tpi_node.model.config import ModelConfig
    from tpi_node.testbed.netns import Testbed
    from tpi_node.testbed.presets import make_spec
    from tpi_node.weights.prepare import resolve_model

    a.model_dir = resolve_model(a.model)
    layers = ModelConfig.from_dir(a.model_dir).num_layers
    lats = sorted(a.latency)
    colls = list(a.collectives)
    e2e_colls = [c for c in colls if c == "star" or cluster_supports_gloo()]
    missing = sorted(set(colls) - set(e2e_colls))
    cmd = "sudo " + " ".join([Path(sys.executable).name, "scripts/bench_testbed.py", *sys.argv[1:]])
    header = [
        cmd,
        f"{datetime.date.today()}, {machine()}",
        f"testbed: every node its own namespace; links {a.rate} each way (tc tbf), one-way latency L "
        f"(delay relay); model {a.model} ({layers} layers); allreduce: {a.wire} wire, {a.ar_tokens} token(s)",
    ]
    for line in header:
        print(f"# {line}", flush=True)
    tb = Testbed(NAME, SUBNET)
    res_ar: dict[tuple, float] = {}
    res_e2e: dict[tuple, dict] = {}
    failed: dict[str, str] = {}
    home = Path(tempfile.mkdtemp(prefix="tpi-bench-testbed-"))
    try:
        for n in sorted(a.nodes):
            tb.up(make_spec(nodes=n, rate=a.rate, latency_ms=0.0), relay=True)
            for coll in colls:
                if not a.skip_allreduce and n > 1:
                    for lat in lats:
                        res_ar[(coll, n, lat)] = bench_allreduce(tb, n, coll, lat, a.iters, a.wire, a.ar_tokens)
                        print(
                            f"#   allreduce {coll} N={n} L={lat:g} ms: {res_ar[(coll, n, lat)] * 1e3:.3f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
                if not a.skip_e2e and coll in e2e_colls and not (n == 1 and coll != colls[0]):
                    try:
                        res_e2e[(coll, n)] = bench_e2e(tb, n, coll, lats, a, home)
                    except RuntimeError as e:
                        if coll == "star":
                            raise
                        # Keep going: the allreduce rows still compare the two; say why.
                        first = next((ln for ln in str(e).splitlines() if "ERROR" in ln or "lost" in ln), str(e)[:200])
                        failed[coll] = "; ".join(filter(None, [failed.get(coll), f"N={n}: {first.strip()}"]))
                        print(f"#   e2e {coll} N={n} failed: {first.strip()}", file=sys.stderr, flush=True)
            tb.down()
    finally:
        tb.down()
        subprocess.run(["rm", "-rf", str(home)])
    data = {
        "header": header,
        "layers": layers,
        "nodes": sorted(a.nodes),
        "lats": lats,
        "colls": colls,
        "missing": missing,
        "failed": failed,
        "allreduce": [[c, n, lat, v] for (c, n, lat), v in res_ar.items()],
        "e2e": [[c, n, lat, r["ttft"], r["tpot"]] for (c, n), rs in res_e2e.items() for lat, r in rs.items()],
    }
    if a.save:
        a.save.parent.mkdir(parents=True, exist_ok=True)
        a.save.write_text(json.dumps(data, indent=1))
    report(data, a.plots)


def projected(res_e2e: dict, res_ar: dict, coll: str, n: int, lat: float, layers: int) -> float | None:
    """Seconds per token for a collective the cluster cannot run end to end: the star's measured
    token latency with the star's allreduce swapped for this collective's (2 per layer)."""
    star = res_e2e.get(("star", n))
    if coll == "star" or star is None:
        return None
    if n == 1:
        return star[lat]["tpot"]
    if (coll, n, lat) not in res_ar or ("star", n, lat) not in res_ar:
        return None
    return star[lat]["tpot"] + 2 * layers * (res_ar[(coll, n, lat)] - res_ar[("star", n, lat)])


def report(data: dict, plot_dir: Path | None) -> None:
    """The tables (markdown) and the plots from one run's results."""
    layers, lats, colls = data["layers"], data["lats"], data["colls"]
    res_ar = {(c, n, lat): v for c, n, lat, v in data["allreduce"]}
    res_e2e: dict[tuple, dict] = {}
    for c, n, lat, ttft, tpot in data["e2e"]:
        res_e2e.setdefault((c, n), {})[lat] = {"ttft": ttft, "tpot": tpot}
    # N = 1 has no collective: the single-node numbers are the first point of every line.
    for coll in colls:
        if (colls[0], 1) in res_e2e and any(k[0] == coll for k in res_e2e):
            res_e2e.setdefault((coll, 1), res_e2e[(colls[0], 1)])

    if res_ar:
        print("\n## Allreduce of one token (576 fp32), median per call, rank 0\n")
        print("| N | L (ms) | " + " | ".join(f"{c} measured (ms) | {c} model (ms) | ratio" for c in colls) + " |")
        print("|---|---|" + "---|---|---|" * len(colls))
        for n in sorted({k[1] for k in res_ar}):
            for lat in lats:
                cells = []
                for c in colls:
                    m = res_ar.get((c, n, lat))
                    base = res_ar.get((c, n, lats[0]))
                    if m is None:
                        cells.append("- | - | -")
                        continue
                    pred = base + steps(c, n) * (lat - lats[0]) / 1e3
                    cells.append(f"{m * 1e3:.3f} | {pred * 1e3:.3f} | {m / pred:.2f}")
                print(f"| {n} | {lat:g} | " + " | ".join(cells) + " |")
        nmax, lmax = max(k[1] for k in res_ar), max(lats)
        if ("star", nmax, lmax) in res_ar and ("gloo", nmax, lmax) in res_ar:
            print(
                f"\nring / star at N={nmax}, {lmax:g} ms: "
                f"{res_ar[('gloo', nmax, lmax)] / res_ar[('star', nmax, lmax)]:.2f}x"
            )
    if res_e2e:
        print("\n## End to end through the API (streaming, greedy): TTFT and time per output token\n")
        print(
            "| N | L (ms) | " + " | ".join(f"{c} TTFT (ms) | {c} ms/token | {c} model ms/token" for c in colls) + " |"
        )
        print("|---|---|" + "---|---|---|" * len(colls))
        for n in sorted({k[1] for k in res_e2e}):
            for lat in lats:
                cells = []
                for c in colls:
                    r = res_e2e.get((c, n))
                    proj = projected(res_e2e, res_ar, c, n, lat, layers)
                    if r is None and proj is not None:
                        cells.append(f"- | ({proj * 1e3:.1f} projected) | -")
                        continue
                    if r is None:
                        cells.append("- | - | -")
                        continue
                    base = r[lats[0]]["tpot"]
                    pred = base + 2 * layers * steps(c, n) * (lat - lats[0]) / 1e3
                    cells.append(f"{r[lat]['ttft'] * 1e3:.0f} | {r[lat]['tpot'] * 1e3:.1f} | {pred * 1e3:.1f}")
                print(f"| {n} | {lat:g} | " + " | ".join(cells) + " |")
    if plot_dir is not None and (res_e2e or res_ar):
        plot_dir.mkdir(parents=True, exist_ok=True)
        print()
        for p in plots(res_e2e, res_ar, data["nodes"], lats, colls, layers, plot_dir):
            print(f"plot: {p.relative_to(REPO) if p.is_relative_to(REPO) else p}")
    for coll, why in data.get("failed", {}).items():
        print(
            f"\nnote: {coll} end to end failed ({why}); its rows without a measurement are "
            f"(projected) = the star's measured ms/token + 2 x layers x (this allreduce - the star's)"
        )
    if data["missing"]:
        print(
            f"\nnote: end to end without {', '.join(data['missing'])}: `tpi-node serve` has no --collective flag "
            f"yet; (projected) = the star's measured ms/token + 2 x layers x (this allreduce - the star's), "
            f"from the allreduce table"
        )


if __name__ == "__main__":
    main()
