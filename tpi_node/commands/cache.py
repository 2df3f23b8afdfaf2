"""`tpi-node cache [list]` and `tpi-node cache prune --keep SIZE | --all`: this machine's shard
cache ($TPI_HOME/shards, weights/cache.py), one line per slice set, and removing the unused ones
(least recently used first). A set a running process holds (a master's plan in force, a worker's
slice) is shown as in use and never removed."""

from __future__ import annotations

import time

from tpi_node.errors import UserError
from tpi_node.paths import shards_dir
from tpi_node.settings import CACHE_ACTIONS, CacheSettings
from tpi_node.units import format_size
from tpi_node.weights import cache


def run(s: CacheSettings) -> int:
    if s.action not in CACHE_ACTIONS:
        raise UserError(f"unknown cache action '{s.action}': use {' or '.join(CACHE_ACTIONS)}")
    if s.action == "list":
        if s.keep is not None or s.prune_all:
            raise UserError("--keep and --all go with `tpi-node cache prune`")
        print_sets()
        return 0
    if (s.keep is None) == (not s.prune_all):
        raise UserError("say what to keep: `tpi-node cache prune --keep SIZE` or `tpi-node cache prune --all`")
    before = cache.cache_bytes()
    removed = cache.prune(None if s.prune_all else s.keep)
    for x in removed:
        print(f"removed {_describe(x)} ({format_size(x.size)})")
    left = cache.list_sets()
    busy = sum(x.in_use() for x in left)
    print(
        f"freed {format_size(max(0, before - cache.cache_bytes()))}; {len(left)} set(s) left "
        f"({format_size(cache.cache_bytes())}), {busy} of them in use"
    )
    return 0


def print_sets() -> None:
    sets = cache.list_sets()
    root = shards_dir()
    if not sets:
        print(f"the shard cache at {root} is empty")
        return
    rows = [("MODEL", "DTYPE", "QUANT", "KV HEADS", "FFN COLUMNS", "SIZE", "LAST USED", "IN USE")]
    for x in reversed(sets):  # most recently used first
        rows.append(
            (
                _model(x),
                x.dtype,
                x.quant,
                _span(x.kv),
                _span(x.ffn),
                format_size(x.size),
                _ago(x.last_used),
                "yes" if x.in_use() else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"{len(sets)} set(s), {format_size(cache.cache_bytes())} in {root}")


def _model(x: cache.CachedSet) -> str:
    return f"{x.model_name} ({x.model_digest})" if x.model_name else x.model_digest


def _span(s: tuple[int, int] | None) -> str:
    return "(by plan)" if s is None else f"{s[0]}-{s[1]}"


def _describe(x: cache.CachedSet) -> str:
    return f"{_model(x)} {x.kind} kv {_span(x.kv)} ffn {_span(x.ffn)}"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return f"{s:.0f} s ago"
