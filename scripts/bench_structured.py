"""What constrained decoding costs: decode tokens/s with and without a JSON schema, side by side.

    python scripts/bench_structured.py [--model DIR] [--tokens 96] [--rounds 3]

1. The engine on the default model (SmolLM2-135M, one node): the same greedy request, plain and
   with a nested JSON schema (response_format), alternated `--rounds` times; decode tokens/s is
   (tokens - 1) / (time of the last token - time of the first). The grammar's mask is computed on
   the engine's grammar thread while the step runs (engine/engine.py), so the goal is <= 10% slower.
2. The matchers alone: microseconds per token to compute the next-token mask along a fixed valid
   JSON text, for llguidance (what tpi-node uses) and, when installed, outlines-core and xgrammar
   (`pip install outlines-core xgrammar` to compare); plus the time to compile the schema.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tpi_node.commands.compose import build_local_engine
from tpi_node.model.grammar import GrammarCompiler, GrammarSpec
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.weights.prepare import prepare_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["engineer", "doctor", "artist"]},
        "skills": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
        },
    },
    "required": ["name", "age", "role", "skills", "address"],
}
VALID = (  # compact, as tpi-node's JSON grammar writes it
    '{"name":"Ada Lovelace","age":36,"role":"engineer","skills":["mathematics","poetry",'
    '"analytical engines"],"address":{"street":"12 St James Square","city":"London"}}'
)


def decode_rate(engine, ids: list[int], params: SamplingParams) -> tuple[float, int]:
    times = [time.perf_counter() for _ in engine.generate_sync(ids, params)]
    return (len(times) - 1) / (times[-1] - times[0]), len(times)


def bench_engine(model, tokens: int, rounds: int) -> None:
    # one token per step in both (constrained sequences do not draft): what the grammar costs alone
    engine = build_local_engine(model, progress=False, speculative="off")
    try:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Describe a famous scientist as a JSON object."}]
        )
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        plain = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        schema = SamplingParams(max_tokens=tokens, temperature=0.0, grammar=GrammarSpec.json_schema(SCHEMA))
        decode_rate(engine, ids, plain)  # warm-up (and the grammar tokenizer's first build)
        decode_rate(engine, ids, schema)
        rates = {"plain": [], "json_schema": []}
        lengths = {"plain": 0, "json_schema": 0}
        for _ in range(rounds):
            for name, p in (("plain", plain), ("json_schema", schema)):
                r, n = decode_rate(engine, ids, p)
                rates[name].append(r)
                lengths[name] = n
    finally:
        engine.shutdown()
    base = statistics.median(rates["plain"])
    print(f"\nengine decode, greedy, median of {rounds} alternated rounds")
    print(f"{'request':<14}{'tokens':>8}{'tok/s':>9}{'vs plain':>10}")
    for name, rs in rates.items():
        med = statistics.median(rs)
        print(f"{name:<14}{lengths[name]:>8}{med:>9.1f}{med / base:>9.2f}x")


def bench_matchers(model) -> None:
    from tpi_node.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model)
    ids = tok.encode(VALID, add_special_tokens=False)
    rows = []
    gc = GrammarCompiler(tok.to_json(), tok.vocab_size, sorted(tok.eos_token_ids))
    gc.compile(GrammarSpec.json_schema({"type": "object"}))  # builds the token trie once
    t0 = time.perf_counter()
    c = gc.compile(GrammarSpec.json_schema(SCHEMA))
    compile_ms = (time.perf_counter() - t0) * 1e3
    per = []
    for t in ids:
        t1 = time.perf_counter()
        allowed = c.allowed()
        per.append(time.perf_counter() - t1)
        assert allowed[t], "the valid text was refused"
        c.accept(t)
    rows.append(("llguidance", compile_ms, statistics.median(per) * 1e6, max(per) * 1e6))
    try:
        import json

        import outlines_core
        import torch
    except ImportError:
        rows.append(("outlines-core", None, None, None))
    else:
        from tpi_node.server.prompts import PromptEncoder

        enc = PromptEncoder(tok)  # token id -> its UTF-8 bytes (Vocabulary.from_pretrained needs the hub)
        table: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i not in tok.eos_token_ids:
                table.setdefault(bytes(enc.piece(i)[1]), []).append(i)
        vocab = outlines_core.Vocabulary(min(tok.eos_token_ids), table)
        t0 = time.perf_counter()
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
        index = outlines_core.Index(regex, vocab)
        oc_compile_ms = (time.perf_counter() - t0) * 1e3
        guide = outlines_core.Guide(index)
        mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
        per = []
        for t in ids:
            t1 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            per.append(time.perf_counter() - t1)
            try:
                guide.advance(t)
            except Exception:
                break  # outlines-core's regex forbids this spelling (whitespace): stop the walk
        rows.append(("outlines-core", oc_compile_ms, statistics.median(per) * 1e6, max(per) * 1e6))
    rows.append(("xgrammar", *_xgrammar(model, ids)))
    print(f"\nmatchers alone: the schema above, {len(ids)} tokens of a valid answer, vocabulary {tok.vocab_size}")
    print(f"{'library':<15}{'compile ms':>11}{'mask us (median)':>18}{'mask us (max)':>15}")
    for name, comp, med, worst in rows:
        if comp is None:
            print(f"{name:<15}{'not installed':>11}")
        else:
            print(f"{name:<15}{comp:>11.1f}{med:>18.1f}{worst:>15.1f}")


def _xgrammar(model, ids: list[int]) -> tuple:
    """xgrammar, when installed (`pip install xgrammar`; its tokenizer comes from transformers)."""
    try:
        import xgrammar as xgr
        from transformers import AutoTokenizer
    except ImportError:
        return None, None, None
    import json

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(str(model)))
    compiler = xgr.GrammarCompiler(info)
    t0 = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_ms = (time.perf_counter() - t0) * 1e3
    matcher, mask, per = xgr.GrammarMatcher(grammar), xgr.allocate_token_bitmask(1, info.vocab_size), []
    for t in ids:
        t1 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        per.append(time.perf_counter() - t1)
        assert matcher.accept_token(t), "the valid text was refused"
    return compile_ms, statistics.median(per) * 1e6, max(per) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model directory (default: the prepared default model)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = args.model or prepare_model(progress=False)
    bench_matchers(model)
    bench_engine(model, args.tokens, args.rounds)


if __name__ == "__main__":
    main()
