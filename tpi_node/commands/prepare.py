"""`tpi-node prepare [NAME]`: prepare a named model in the model cache and print its directory."""

from __future__ import annotations

from tpi_node.settings import PrepareSettings
from tpi_node.weights.prepare import prepare_model


def run(s: PrepareSettings) -> int:
    print(prepare_model(s.name))
    return 0
