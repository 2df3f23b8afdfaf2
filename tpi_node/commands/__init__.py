"""The subcommands, one module each (tpi_node/commands/NAME.py, with its `run`); `commands()` is
what the CLI (tpi_node/cli.py) offers.

A command is its name, a one-line help, its settings family (tpi_node/settings.py) and its
module's `run`, which takes the loaded, frozen settings and returns the exit code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tpi_node import settings as s


@dataclass(frozen=True)
class Command:
    name: str  # also its module's
    help: str
    settings: type

    def run(self, settings) -> int:
        """The command's module is imported only now: a `tpi-node join` process loads no HTTP
        server, `tpi-node cache` no model code (~0.2 s less at every start)."""
        return importlib.import_module(f"{__name__}.{self.name}").run(settings)


def commands() -> list[Command]:
    """Every subcommand, in the order `tpi-node --help` lists them."""
    return [
        Command(
            "prepare",
            "prepare a named model in the model cache (its GGUF as it is) and print its directory",
            s.PrepareSettings,
        ),
        Command("synth", "write a checkpoint with random weights and the real shapes of a preset", s.SynthSettings),
        Command("generate", "generate text for one prompt (text on stdout, logs on stderr)", s.GenerateSettings),
        Command("serve", "run the master: the OpenAI API, and the gRPC port workers join", s.ServeSettings),
        Command("join", "join a master as a worker and serve its slice of the model", s.JoinSettings),
        Command("run", "a master plus N-1 local workers (each a `tpi-node join` process)", s.RunSettings),
        Command("status", "print the cluster table of a running master", s.StatusSettings),
        Command(
            "cache",
            "list this machine's shard cache (cache list), or remove unused slice sets (cache prune)",
            s.CacheSettings,
        ),
        Command(
            "token", "make a new cluster token (give it to every node: --token or TPI_CLUSTER_TOKEN)", s.TokenSettings
        ),
        Command("certs", "create a cluster CA and node certificates for mutual TLS", s.CertsSettings),
    ]
