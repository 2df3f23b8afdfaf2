"""Sizes as people write them: parse_size("2GiB") -> 2147483648, format_size(n) -> "2.00 GiB"."""

from __future__ import annotations

import re

from tpi_node.errors import UserError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,  # docker style: 500m = 500 MiB
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648. K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000."""
    if isinstance(text, int):
        value, unit = text, ""
    else:
        m = _SIZE.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UserError(f"bad memory size {text!r}: use a number with an optional unit, e.g. 2GiB, 500M, 8GB")
        value, unit = float(m.group(1)), m.group(2).lower()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise UserError(f"memory size must be positive, got {text!r}")
    return n


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
