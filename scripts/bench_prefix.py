"""Prefix caching on a multi-turn chat: TTFT per turn with the prefix cache on and off, side by side.

A 10-turn conversation with a ~1,500-token system prompt (the client resends everything each
turn, as chat clients do), greedy, on 1 and on 3 local nodes. Also the decode speed with the
paged cache, and, with --baseline REV, the decode speed of the engine at git revision REV (the
slot cache before paging) measured in the same run.

    python scripts/bench_prefix.py                       # 1 and 3 nodes, cache on and off
    python scripts/bench_prefix.py --nodes 1 --baseline 1f73dd4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?",
    "Name a large ocean.",
    "Who wrote Hamlet?",
    "What is H2O?",
    "How many legs has a spider?",
    "What is the tallest mountain?",
    "Name a prime number.",
    "What colour is the sky?",
    "Who painted the Mona Lisa?",
    "What is the speed of light?",
]
SENTENCE = (
    "You are a helpful assistant for a museum of natural history; answer briefly and kindly, "
    "cite the exhibit hall when you know it, and never invent facts. "
)


def system_prompt(tok, tokens: int) -> str:
    text = ""
    while len(tok.encode(text)) < tokens:
        text += SENTENCE
    return text


def chat(engine, turns: int, system_tokens: int, new_tokens: int) -> list[dict]:
    """Each turn: resend the whole conversation; -> per turn TTFT, prompt and cached tokens, decode tok/s."""
    from tpi_node.model.sampling_params import SamplingParams

    tok = engine.tokenizer
    messages = [{"role": "system", "content": system_prompt(tok, system_tokens)}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        t0, stamps, text, cached = time.perf_counter(), [], [], None
        for ev in engine.generate_sync(ids, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)):
            stamps.append(time.perf_counter())
            text.append(ev.text)
            cached = ev.cached_tokens if cached is None else cached
        messages.append({"role": "assistant", "content": "".join(text)})
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        rows.append(
            {
                "turn": turn + 1,
                "prompt": len(ids),
                "cached": cached or 0,
                "ttft": stamps[0] - t0,
                "decode": decode,
                "text": "".join(text),
            }
        )
    return rows


def run_config(model: str, nodes: int, prefix_cache: bool, a) -> list[dict]:
    from tpi_node.commands.compose import build_local_engine
    from tpi_node.commands.local_cluster import LocalCluster
    from tpi_node.settings import MasterSettings

    if nodes == 1:
        engine = build_local_engine(model, progress=False, prefix_cache=prefix_cache)
        try:
            return chat(engine, a.turns, a.system_tokens, a.new_tokens)
        finally:
            engine.shutdown()
    cluster = LocalCluster(
        MasterSettings(model=model, device="cpu", node_id="bench", speed=1.0, no_prefix_cache=not prefix_cache), nodes
    )
    try:
        return chat(cluster.running.engine, a.turns, a.system_tokens, a.new_tokens)
    finally:
        cluster.close()


DECODE_PROBE = r"""
import json, sys, time
try:
    from tpi_node.commands.compose import build_local_engine
except ImportError:  # before the commands/ package
    from tpi_node.engine.local import build_local_engine
from tpi_node.model.sampling_params import SamplingParams
e = build_local_engine(sys.argv[1], progress=False)
ids = e.tokenizer.encode(sys.argv[2])
list(e.generate_sync(ids, SamplingParams(max_tokens=4, temperature=0.0)))
best = 0.0
for _ in range(3):
    p = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    stamps = [time.perf_counter() for _ in e.generate_sync(ids, p)]
    best = max(best, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
e.shutdown()
print(json.dumps({"decode": best}))
"""


def decode_at(tree: Path, model: str, prompt: str) -> float:
    """Decode tokens/s of the engine in `tree` (its own process, its own code)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TPI_HOME": os.environ.get("TPI_HOME", "")}
    env = {k: v for k, v in env.items() if v}
    r = subprocess.run(
        [sys.executable, "-c", DECODE_PROBE, model, prompt],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode != 0:
        raise SystemExit(f"decode probe in {tree} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["decode"]


def baseline_tree(rev: str, tmp: Path) -> Path:
    """A checkout of `rev` with its generated wire code."""
    tree = tmp / f"rev-{rev}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), rev], check=True, capture_output=True
    )
    out = tree / "tpi_node" / "proto"
    out.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tree / 'protos'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(tree / "protos" / "tpi.proto"),
        ],
        check=True,
    )
    grpc_py = out / "tpi_pb2_grpc.py"
    grpc_py.write_text(grpc_py.read_text().replace("import tpi_pb2 as", "from . import tpi_pb2 as"))
    (out / "__init__.py").write_text("")
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--baseline", metavar="REV", help="also measure decode tokens/s of the engine at this revision")
    a = ap.parse_args()
    from tpi_node.weights.prepare import resolve_model

    model = str(resolve_model(a.model))
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    print(
        f"# {a.model}, {a.turns} turns, ~{a.system_tokens}-token system prompt, {a.new_tokens} new tokens "
        f"greedy; {cpu}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    for nodes in a.nodes:
        off = run_config(model, nodes, False, a)
        on = run_config(model, nodes, True, a)
        same = all(x["text"] == y["text"] for x, y in zip(off, on))
        print(f"\n## {nodes} node(s): the same text with and without the cache: {same}")
        print(
            "| turn | prompt tokens | cached | TTFT off (s) | TTFT on (s) | on/off | decode off tok/s "
            "| decode on tok/s |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for x, y in zip(off, on):
            print(
                f"| {x['turn']} | {x['prompt']} | {y['cached']} | {x['ttft']:.3f} | {y['ttft']:.3f} | "
                f"{y['ttft'] / x['ttft']:.2f} | {x['decode']:.1f} | {y['decode']:.1f} |"
            )
        later = [y["ttft"] / x["ttft"] for x, y in zip(off[1:], on[1:])]
        if later:
            print(f"turns 2-{a.turns}: TTFT on/off mean {sum(later) / len(later):.2f}, worst {max(later):.2f}")
    if a.baseline:
        prompt = system_prompt(
            __import__("tpi_node.model.tokenizer", fromlist=["Tokenizer"]).Tokenizer.from_dir(model), 200
        )
        with tempfile.TemporaryDirectory(prefix="tpi-bench-") as tmp:
            tree = baseline_tree(a.baseline, Path(tmp))
            try:
                old, new = decode_at(tree, model, prompt), decode_at(ROOT, model, prompt)
            finally:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True
                )
        print(
            f"\n## decode, 1 node, 64 tokens after a 200-token prompt (best of 3, same run)\n"
            f"| engine | decode tok/s |\n|---|---:|\n| {a.baseline} (slot cache) | {old:.1f} |\n"
            f"| this tree (paged cache) | {new:.1f} |\nratio paged/slot: {new / old:.2f}"
        )


if __name__ == "__main__":
    main()
