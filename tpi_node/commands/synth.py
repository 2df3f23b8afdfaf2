"""`tpi-node synth --preset P --out DIR`: a checkpoint with random weights and a preset's shapes."""

from __future__ import annotations

from tpi_node.errors import UserError
from tpi_node.model.presets import PRESETS
from tpi_node.settings import SynthSettings
from tpi_node.weights.synth import synthesize


def run(s: SynthSettings) -> int:
    if s.preset not in PRESETS:
        raise UserError(f"unknown preset '{s.preset}'; known: {', '.join(sorted(PRESETS))}")
    if not s.out:
        raise UserError("give the output folder: tpi-node synth --preset P --out DIR")
    print(synthesize(s.preset, s.out, layers=s.layers, dtype=s.dtype or "fp32", seed=s.seed or 0, quant=s.quant))
    return 0
