"""Testbed presets: what one emulated link and one emulated device look like.

A preset is a YAML file in configs/testbed/ (name.yaml):

    nodes: 4                 # default node count
    link: {rate: 300mbit, latency_ms: 1}
    node: {memory: 8GiB, cpus: 8}

Every field can be overridden on the command line; `rate: null` or `latency_ms: 0` turn that part
of the shaping off, `memory: null` / `cpus: null` leave the node unlimited.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from tpi_node import units
from tpi_node.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "testbed"

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_rate(text: str | int | None) -> int | None:
    """'300mbit' -> 300_000_000 bits/s; None, 0 or 'none' -> None (unshaped)."""
    if text in (None, 0, "0", "none", "null", ""):
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?bit)\s*", str(text).lower())
    if not m:
        raise UserError(f"bad link rate '{text}' (write e.g. 300mbit, 1gbit)")
    return int(float(m.group(1)) * _RATE_UNITS[m.group(2)])


def parse_size(text: str | int | None) -> int | None:
    """'8GiB' -> 8 * 2**30 bytes (the units every --memory-budget takes); None -> None (unlimited)."""
    if text in (None, 0, "0", "none", "null", ""):
        return None
    return units.parse_size(text)


@dataclasses.dataclass(frozen=True)
class TestbedSpec:
    """Everything `up` builds: N nodes, each with the same link and device limits."""

    nodes: int = 3
    rate_bps: int | None = None  # per link, each direction (tc tbf); None = unshaped
    latency_ms: float = 0.0  # one-way node-to-node latency (delay relay); 0 = none
    memory_bytes: int | None = None  # per node (memory cgroup); None = unlimited
    cpus: float | None = None  # per node (CFS quota); None = unlimited
    preset: str = "custom"

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 200:
            raise UserError(f"nodes must be 1..200, got {self.nodes}")
        if self.latency_ms < 0:
            raise UserError(f"latency must be >= 0 ms, got {self.latency_ms}")
        if self.cpus is not None and self.cpus <= 0:
            raise UserError(f"cpus must be > 0, got {self.cpus}")

    def describe(self) -> str:
        rate = f"{self.rate_bps / 1e6:g} Mbit/s" if self.rate_bps else "unshaped"
        mem = f"{self.memory_bytes / 2**30:g} GiB" if self.memory_bytes else "no memory limit"
        cpu = f"{self.cpus:g} CPUs" if self.cpus else "all CPUs"
        return f"{self.nodes} nodes, {rate}, {self.latency_ms:g} ms, {mem}, {cpu} ({self.preset})"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith(".yaml") else PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown testbed preset '{name}'; known: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a preset is a mapping (nodes, link, node)")
    return data


def make_spec(preset: str | None = None, **overrides) -> TestbedSpec:
    """The preset's values with every override that is not None applied on top."""
    data = load_preset(preset) if preset else {}
    link, node = data.get("link") or {}, data.get("node") or {}
    values = {
        "nodes": data.get("nodes", 3),
        "rate_bps": parse_rate(link.get("rate")),
        "latency_ms": float(link.get("latency_ms") or 0.0),
        "memory_bytes": parse_size(node.get("memory")),
        "cpus": node.get("cpus"),
        "preset": preset or "custom",
    }
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "rate":
            values["rate_bps"] = parse_rate(value)
        elif key == "memory":
            values["memory_bytes"] = parse_size(value)
        else:
            values[key] = value
    if values["cpus"] is not None:
        values["cpus"] = float(values["cpus"])
    return TestbedSpec(**values)
