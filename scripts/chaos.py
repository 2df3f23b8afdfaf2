"""Chaos on the namespace testbed: streaming clients keep a cluster busy while its nodes fail.

    sudo .venv/bin/python scripts/chaos.py [--minutes 9] [--clients 8] [--nodes 3] [--preset tpi-paper]
         [--kill-every 90] [--tokens 24]

A real cluster (`tpi-node serve` on n0, `tpi-node join` on the others, each in its own network
namespace with the preset's link) serves SmolLM2. First every prompt's greedy reference text is
taken from the healthy cluster; then --clients threads stream greedy chat completions of those
prompts, one after another, while a schedule of faults runs:
  - every --kill-every seconds a worker (n1, n2, ... in turn) is killed with SIGKILL and started
    again 5 s later (same TPI_HOME: its node id and shard cache survive);
  - once, at 1/2 of the first interval, a worker's links are blocked for 10 s (nft drops every
    packet in its namespace but loopback);
  - once, at 5/2 intervals, the master is stopped (SIGTERM) and started again; the workers must
    find it again by themselves.
Each request ends as one of: completed (its text is the reference), clean error (an HTTP error or
an SSE event with the OpenAI error shape), lost text (it ended without error but with other
text), hung (no end within --hang-s of its start), refused (no answer to the request at all: the
master was down; the client waits a second and goes on). The table: those counts, the master's RSS after the
first --warmup seconds of load and at the end, and whether the cluster is back to full size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAME, SUBNET = "tpichaos", "10.231.13.0/24"
PROMPTS = [
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "List two uses of a paperclip.",
    "Describe a cat in one sentence.",
    "What do bees make?",
]
BLOCK_RULES = """table inet tpichaos {
  chain in { type filter hook input priority 0; policy accept; iifname != "lo" drop; }
  chain out { type filter hook output priority 0; policy accept; oifname != "lo" drop; }
}
"""


def stream(url: str, model: str, prompt: str, tokens: int, hang_s: float) -> tuple[str, str]:
    """One greedy streamed chat completion -> (outcome, text or reason)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    text, t0, answered = [], time.monotonic(), False
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=hang_s) as r:
            answered = True
            if r.status_code != 200:
                r.read()
                return (
                    "clean error" if _is_error_shape(r.text) else "unclean error"
                ), f"{r.status_code} {r.text[:120]}"
            for line in r.iter_lines():
                if time.monotonic() - t0 > hang_s:
                    return "hung", f"still streaming after {hang_s:.0f} s"
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return "done", "".join(text)
                event = json.loads(data)
                if "error" in event:
                    return ("clean error" if _is_error_shape(data) else "unclean error"), data[:120]
                for ch in event.get("choices", []):
                    text.append(ch.get("delta", {}).get("content") or "")
        return "unclean error", "the stream ended without [DONE]"
    except httpx.TimeoutException:
        return "hung", f"no byte for {hang_s:.0f} s"
    except (httpx.HTTPError, ValueError) as e:
        # No answer at all: nothing listened (the node's delay relay accepts, then drops the
        # connection when the master's port is closed), so the request never reached a server.
        return ("unclean error" if answered else "refused"), f"{type(e).__name__}: {e}"


def _is_error_shape(text: str) -> bool:
    try:
        err = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Chaos:
    def __init__(self, tb, cluster, a) -> None:
        self.tb, self.c, self.a = tb, cluster, a
        self.events: list[str] = []
        self.t0 = time.monotonic()

    def log(self, what: str) -> None:
        master = self.c.running["n0"]
        rss = f"{rss_bytes(master.pid) / 2**20:.0f} MiB" if master.poll() is None else "-"
        line = f"{time.monotonic() - self.t0:6.1f} s  {what:<34} (master RSS {rss})"
        self.events.append(line)
        print(f"# {line}", file=sys.stderr, flush=True)

    def kill_worker(self, node: str) -> None:
        self.c.running[node].send_signal(signal.SIGKILL)
        self.c.running[node].wait()
        self.log(f"{node} killed -9")
        time.sleep(5)
        self.c.restart(node)
        self.log(f"{node} started again")

    def block_links(self, node: str, seconds: float = 10.0) -> None:
        ns = self.tb.resolve(node).name
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=BLOCK_RULES, text=True, check=True)
        self.log(f"{node}'s links blocked")
        time.sleep(seconds)
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "tpichaos"], check=True)
        self.log(f"{node}'s links open again")

    def restart_master(self) -> None:
        p = self.c.running["n0"]
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            self.log("the master did not stop within 30 s of SIGTERM: killed")
        self.log("master stopped (SIGTERM)")
        time.sleep(2)
        self.c.restart("n0")
        self.log("master started again")

    def schedule(self, stop: threading.Event) -> None:
        """The faults, in time order, until the run's end."""
        every, workers = self.a.kill_every, [f"n{i}" for i in range(1, self.a.nodes)]
        plan = [(every / 2, lambda: self.block_links(workers[-1]))]
        plan += [
            (every * (k + 1), (lambda w: lambda: self.kill_worker(w))(workers[k % len(workers)])) for k in range(32)
        ]
        plan.append((every * 2.5, self.restart_master))
        for at, fault in sorted(plan, key=lambda p: p[0]):
            if stop.wait(max(0.0, self.t0 + at - time.monotonic())) or at > self.a.minutes * 60 - 30:
                return
            fault()


def client(url, model, refs, a, stop, results, lock, k) -> None:
    i = k
    while not stop.is_set():
        prompt = PROMPTS[i % len(PROMPTS)]
        t0 = time.monotonic()
        outcome, detail = stream(url, model, prompt, a.tokens, a.hang_s)
        took = time.monotonic() - t0
        if outcome == "done":
            outcome = "completed" if detail == refs[prompt] else "lost text"
        with lock:
            results.append((outcome, took, detail if outcome != "completed" else ""))
        if outcome == "refused":
            time.sleep(1)
        i += 1


def wait_full(c, nodes: int, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        code, body = c.health()
        if code == 200 and body and len(body.get("nodes", [])) >= nodes:
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8.5)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--preset", default="tpi-paper")
    ap.add_argument("--kill-every", type=float, default=90.0)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--warmup", type=float, default=45.0, help="seconds of load before the faults (and RSS start)")
    ap.add_argument("--hang-s", type=float, default=30.0, help="a request with no end this long after it began hung")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    a = ap.parse_args()

    from bench_testbed import machine

    from tpi_node.testbed.cluster import TestbedCluster
    from tpi_node.testbed.netns import Testbed
    from tpi_node.testbed.presets import make_spec
    from tpi_node.weights.prepare import resolve_model

    model_dir = resolve_model(a.model)
    print(f"# sudo {Path(sys.executable).name} scripts/chaos.py {' '.join(sys.argv[1:])}")
    print(f"# {datetime.date.today()}, {machine()}; {a.nodes} nodes on {a.preset}, {a.clients} clients")
    tb = Testbed(NAME, SUBNET)
    home = Path(tempfile.mkdtemp(prefix="tpi-chaos-"))
    spec = make_spec(a.preset, nodes=a.nodes, memory=None, cpus=None)
    tb.up(spec, relay=True)
    c = TestbedCluster(
        tb, model_dir, nodes=a.nodes, home_root=home, serve_args=("--speed", "1"), join_args=("--speed", "1")
    )
    try:
        c.start(timeout=300)
        url = c.url
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        refs = {}
        for p in PROMPTS:
            outcome, text = stream(url, model, p, a.tokens, 120)
            if outcome != "done":
                raise SystemExit(f"the healthy cluster failed the reference request: {outcome}: {text}")
            refs[p] = text
        stop, lock, results = threading.Event(), threading.Lock(), []
        threads = [
            threading.Thread(target=client, args=(url, model, refs, a, stop, results, lock, k), daemon=True)
            for k in range(a.clients)
        ]
        for t in threads:
            t.start()
        time.sleep(a.warmup)  # the KV pool's pages and the allocator's caches fill under this load
        rss_start = rss_bytes(c.running["n0"].pid)
        chaos = Chaos(tb, c, a)
        faults = threading.Thread(target=chaos.schedule, args=(stop,), daemon=True)
        faults.start()
        time.sleep(a.minutes * 60)
        stop.set()
        faults.join()
        for t in threads:
            t.join(a.hang_s + 30)
        still = sum(t.is_alive() for t in threads)
        back = wait_full(c, a.nodes, 120)
        rss_end = rss_bytes(c.running["n0"].pid)
    finally:
        logs = {node: c.log(node, 2000) for node in c.running}
        c.stop()
        tb.down(quiet=True)

    counts = Counter(o for o, _, _ in results)
    counts["hung"] += still
    slowest = max((t for o, t, _ in results if o != "refused"), default=0.0)
    print("\nfaults:\n" + "\n".join(f"  {e}" for e in chaos.events))
    bad = [(o, d) for o, _, d in results if o in ("lost text", "unclean error", "hung")]
    for o, d in bad[:10]:
        print(f"  {o}: {d}")
    if bad and os.environ.get("TPI_CHAOS_LOGS"):
        print("\n".join(logs.values()))
    print(
        f"\n{'requests':>9}{'completed':>10}{'clean errors':>13}{'unclean':>8}{'hung':>5}{'lost text':>10}"
        f"{'refused':>8}{'slowest s':>10}{'master RSS start':>17}{'end':>9}{'full size again':>16}"
    )
    print(
        f"{len(results):>9}{counts['completed']:>10}{counts['clean error']:>13}{counts['unclean error']:>8}"
        f"{counts['hung']:>5}{counts['lost text']:>10}{counts['refused']:>8}{slowest:>10.1f}"
        f"{rss_start / 2**20:>13.0f} MiB{rss_end / 2**20:>5.0f} MiB"
        f"{(f'yes, {back:.0f} s' if back is not None else 'NO'):>16}"
    )


if __name__ == "__main__":
    main()
