#!/usr/bin/env python3
"""Single-node speed: tpi-node vs Hugging Face transformers' generate, side by side in one run.

Same model (SmolLM2-135M-Instruct, fp32), same prompt, same thread count, greedy. Prints TTFT,
decode tokens/s, and the memory-bandwidth bound (weight bytes read per decoded token divided by
the copy bandwidth measured here).

    .venv/bin/python scripts/bench_single.py [--threads 2] [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

PROMPT = "Write a long story about a robot who learns to paint, with many details."


def measure_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large copy (read + write counted), the bound of a weight-streaming decode."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def bench_tpi(model_dir, ids, n_tokens):
    from tpi_node.commands.compose import build_local_engine
    from tpi_node.model.sampling_params import SamplingParams

    engine = build_local_engine(model_dir, progress=False)
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    list(engine.generate_sync(ids, SamplingParams(max_tokens=4, temperature=0)))  # warm up
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.generate_sync(ids, params)]
    engine.shutdown()
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_hf(model_dir, ids, n_tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    stamps = []

    class Clock(transformers.generation.streamers.BaseStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.no_grad():
        model.generate(x, max_new_tokens=4, do_sample=False)  # warm up
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, streamer=Clock())
    stamps = stamps[1:]  # the streamer's first put is the prompt itself
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tpi_node.model.config import ModelConfig
    from tpi_node.model.tokenizer import Tokenizer
    from tpi_node.weights.prepare import resolve_model

    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False)

    rows = {"tpi-node": [], "transformers": []}
    for _ in range(args.repeats):  # interleaved, so drift of a noisy machine hits both alike
        rows["tpi-node"].append(bench_tpi(model_dir, ids, args.tokens))
        rows["transformers"].append(bench_hf(model_dir, ids, args.tokens))

    bw = measure_bandwidth()
    # bytes read per decoded token: every layer matrix + the lm_head (tied embedding), fp32
    weight_bytes = 4 * (cfg.num_layers * cfg.layer_param_count() + cfg.vocab_size * cfg.hidden_size)
    bound = bw / weight_bytes

    names = (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    cpu = next(names, platform.processor())
    print(
        f"\nmodel {args.model} fp32, prompt {len(ids)} tokens, {args.tokens} decoded tokens, "
        f"{args.threads} threads, median of {args.repeats}; CPU: {cpu}; torch {torch.__version__}"
    )
    print(f"{'engine':<14}{'TTFT (ms)':>12}{'decode tok/s':>15}{'of bound':>10}")
    med = {}
    for name, r in rows.items():
        ttft = statistics.median(x[0] for x in r) * 1000
        tps = statistics.median(x[1] for x in r)
        med[name] = tps
        print(f"{name:<14}{ttft:>12.1f}{tps:>15.1f}{tps / bound:>10.0%}")
    print(
        f"{'bandwidth bound':<14}{'':>12}{bound:>15.1f}   "
        f"({weight_bytes / 2**20:.0f} MiB per token at {bw / 1e9:.1f} GB/s copy)"
    )
    print(f"decode speed-up tpi-node / transformers: {med['tpi-node'] / med['transformers']:.2f}x")


if __name__ == "__main__":
    main()
