"""Subcommands that work on one machine: prepare, synth, generate."""
from __future__ import annotations

import argparse
import sys
import time

from tpi_node.engine.device import add_device_flag
from tpi_node.errors import UserError


def _positive_int(s):
    from tpi_node.cli import positive_int
    return positive_int(s)


def _non_negative(s):
    from tpi_node.cli import non_negative_float
    return non_negative_float(s)


def _unit_interval(s: str) -> float:
    v = _non_negative(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags every command that loads a model shares."""
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a model name (prepared on first use) or a Hugging Face style directory")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="compute dtype (default: fp32 on CPU, bf16 on CUDA sm_80+ and MPS)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="per-node memory budget (e.g. 2GiB); streams layers through a window when the model does not fit")


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="convert a named model into the model cache and print its directory")
    p.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("synth", help="write a checkpoint with random weights and the real shapes of a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=_positive_int, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("generate", help="generate text for one prompt (text on stdout, logs on stderr)")
    add_model_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message through the chat template")
    p.add_argument("--max-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=_non_negative, default=0.0)
    p.add_argument("--top-p", type=_unit_interval, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--nodes", type=_positive_int, default=1, help="local cluster size (master + N-1 workers)")
    add_device_flag(p)
    p.set_defaults(func=cmd_generate)


def cmd_prepare(args) -> int:
    from tpi_node.weights.prepare import PrepareError, prepare_model

    try:
        print(prepare_model(args.name))
    except PrepareError as e:
        raise UserError(str(e)) from None
    return 0


def cmd_synth(args) -> int:
    from tpi_node.model.presets import PRESETS
    from tpi_node.weights.synth import synthesize

    if args.preset not in PRESETS:
        raise UserError(f"unknown preset '{args.preset}'; known: {', '.join(sorted(PRESETS))}")
    print(synthesize(args.preset, args.out, layers=args.layers, dtype=args.dtype, seed=args.seed))
    return 0


def resolve(model: str):
    from tpi_node.weights.prepare import PrepareError, resolve_model

    try:
        return resolve_model(model)
    except PrepareError as e:
        raise UserError(str(e)) from None


def cmd_generate(args) -> int:
    from tpi_node.model.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    model_dir = resolve(args.model)
    engine, cleanup = _open_engine(args, model_dir)
    try:
        tok = engine.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        ids = tok.encode(text, add_special_tokens=not args.chat)
        t0, n, t_first = time.monotonic(), 0, None
        for ev in engine.generate_sync(ids, params):
            t_first = t_first or time.monotonic()
            n += 1
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        dt = time.monotonic() - (t_first or t0)
        print(f"[tpi-node] {len(ids)} prompt tokens, {n} generated; ttft {(t_first or t0) - t0:.3f} s, "
              f"{(n - 1) / dt if n > 1 and dt > 0 else 0:.1f} tokens/s", file=sys.stderr)
        _log_node_stats(engine)
    finally:
        cleanup()
    return 0


def _log_node_stats(engine) -> None:
    for node, s in engine.driver.stats().items():
        parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()]
        print(f"[tpi-node] node {node}: " + " ".join(parts), file=sys.stderr)


def _open_engine(args, model_dir):
    """The engine for `generate`: one node, or a local cluster of --nodes processes."""
    if args.nodes > 1:
        from tpi_node.cluster.commands import local_cluster_engine  # noqa: PLC0415

        return local_cluster_engine(model_dir, args)
    from tpi_node.engine.device import default_dtype, device_from_args
    from tpi_node.engine.local import build_local_engine

    info = device_from_args(args)
    print(f"[tpi-node] computing on {info.summary()}", file=sys.stderr)
    engine = build_local_engine(model_dir, dtype=default_dtype(info, args.dtype), memory_budget=args.memory_budget,
                                device=str(info.device))
    return engine, engine.shutdown
