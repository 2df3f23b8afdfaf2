"""The subcommands, one module each; `COMMANDS` is what the CLI (tpi_node/cli.py) offers.

A command is its name, a one-line help, its settings family (tpi_node/settings.py) and a function
that takes the loaded, frozen settings and returns the exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    settings: type
    run: Callable[..., int]


def commands() -> list[Command]:
    """Every subcommand, in the order `tpi-node --help` lists them (imported here, when asked,
    so that `tpi-node --version` loads no torch)."""
    from tpi_node.commands import cache, certs, generate, join, prepare, run, serve, status, synth, token

    return [m.COMMAND for m in (prepare, synth, generate, serve, join, run, status, cache, token, certs)]
