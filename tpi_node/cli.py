"""tpi-node: the command line. Each area registers its own subcommands; this file only collects
them, sets up logging, and turns user errors into one clear line and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tpi_node import __version__
from tpi_node.errors import UserError

# Modules that contribute subcommands through `add_commands(subparsers)`.
COMMAND_MODULES = [
    "tpi_node.commands_model",      # prepare, synth, generate
    "tpi_node.cluster.commands",    # serve, join, run
    "tpi_node.cluster.ops_commands",  # status, token, certs
]


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a number") from None
    if v < 0 or v != v:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpi-node", description="Serve one large language model from the machines you own: "
                                "tensor parallel over gRPC, layers streamed from disk, an OpenAI-compatible API.")
    p.add_argument("--version", action="version", version=f"tpi-node {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # an optional area not installed in this build
            if e.name and name.startswith(e.name):
                continue
            raise
        mod.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"tpi-node: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpi-node: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
