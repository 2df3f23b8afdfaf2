"""tpi-node: the command line. Builds one subparser per command (tpi_node/commands) from its
settings family, loads the frozen settings (flags > TPI_* > --config YAML > defaults), sets up
logging, and turns user errors into one clear line and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys

from tpi_node import __version__
from tpi_node.commands import commands
from tpi_node.errors import UserError
from tpi_node.settings import add_flags, load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tpi-node",
        description="Serve one large language model from the machines you own: "
        "tensor parallel over gRPC, layers streamed from disk, an OpenAI-compatible API.",
    )
    p.add_argument("--version", action="version", version=f"tpi-node {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        add_flags(sp, cmd.settings)
        sp.set_defaults(_command=cmd)
    return p


def parse(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None):
    """argv -> (the command or None, its loaded settings or None, verbose). UserError for a bad
    value from the environment or the --config file (bad flags exit through argparse)."""
    parser = parser or build_parser()
    given = vars(parser.parse_args(argv))
    verbose, cmd = given.pop("verbose"), given.pop("_command", None)
    given.pop("command", None)
    return cmd, (load(cmd.settings, given) if cmd is not None else None), verbose


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        cmd, settings, verbose = parse(argv, parser)
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        if cmd is None:
            parser.print_help(sys.stderr)
            return 2
        return int(cmd.run(settings) or 0)
    except UserError as e:
        print(f"tpi-node: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tpi-node: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
