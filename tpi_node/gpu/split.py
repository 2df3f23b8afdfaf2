"""Token splitting (TokenWeave): run a step's tokens as two halves so that one half's
communication overlaps the other half's compute.

    tokens [T] -> A = [0, s), B = [s, T)
    issue order:  A.stage0  B.stage0  A.stage1  B.stage1 ...   (stages alternate compute, comm)

With stages [attention, allreduce, mlp, allreduce], A's allreduce runs while B computes its
attention, and B's allreduce while A computes its MLP. B's stage k never starts before A's
stage k is done, so B's attention sees the KV entries A wrote in that layer (A holds the earlier
tokens of any sequence cut by the split). All nodes issue collectives in the same order.

`split_point` picks s for a GPU group (wave-aware), `half_point` for the gRPC star (the middle);
`split_schedule` gives the issue order; `run_split` runs stage functions in that order, inline
(the star: each stage computes, then *starts* its allreduce, and the next stage of the same half
waits for it, so the issue order A.compute A.start B.compute B.start A.wait ... overlaps A's
allreduce with B's compute) or on two CUDA streams (GPU path). Nothing here imports CUDA or triton.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_THRESHOLD = 1024  # an NVLink group's --token-split auto
# The gRPC star's --token-split auto, measured (scripts/bench_split.py: TTFT at 3 nodes, every step
# split vs none): on 100-300 Mbit/s links the split pays from 64 tokens (0.6-0.7x), on gigabit and
# unshaped links it costs below 256 (1.1-1.5x: twice the round trips, little wire to hide) and
# breaks even or pays from 256 (0.75-1.05x); a prefill chunk (512) splits.
STAR_THRESHOLD = 256
DEFAULT_TILE = 128  # rows of a GEMM tile (M) in the projection kernels
SLACK = 0.125  # the split may move up to 1/8 of the tokens away from the middle


def wave_waste(n: int, wave: int) -> int:
    """Idle row slots in the last wave when n rows run `wave` at a time."""
    return math.ceil(n / wave) * wave - n if n else 0


def split_point(
    n_tokens: int, *, sm_count: int, threshold: int = DEFAULT_THRESHOLD, tile: int = DEFAULT_TILE, rows_per_sm: int = 1
) -> int:
    """Where to cut a step of n_tokens: 0 for "do not split", else s with 0 < s < n_tokens.

    Candidates are multiples of `tile` (so neither half ends in a partial GEMM tile) within
    SLACK of the middle. Among them, the one whose two halves leave the fewest idle slots in the
    last wave of the row-parallel kernels (one program per token, sm_count * rows_per_sm at a
    time) wins; ties go to the one nearer the middle, then the smaller.
    """
    if n_tokens < max(threshold, 2 * tile):
        return 0
    if sm_count < 1 or tile < 1 or rows_per_sm < 1:
        raise ValueError(
            f"split_point: sm_count, tile and rows_per_sm must be >= 1 (got {sm_count}, {tile}, {rows_per_sm})"
        )
    wave = sm_count * rows_per_sm
    half = n_tokens / 2
    lo = max(tile, math.ceil((half - SLACK * n_tokens) / tile) * tile)
    hi = min(n_tokens - tile, math.floor((half + SLACK * n_tokens) / tile) * tile)
    if lo > hi:  # no tile multiple near the middle: round the middle to the tile
        return min(max(tile, round(half / tile) * tile), n_tokens - tile)

    def cost(s: int) -> tuple[int, float, int]:
        return (wave_waste(s, wave) + wave_waste(n_tokens - s, wave), abs(s - half), s)

    return min(range(lo, hi + 1, tile), key=cost)


def split_threshold(mode: str | int, default: int) -> int:
    """--token-split (auto, off or a token count) -> the threshold a collective splits at (0: never)."""
    if mode == "auto":
        return default
    return 0 if mode == "off" else int(mode)


def half_point(n_tokens: int, threshold: int) -> int:
    """The star's cut: the middle of a step of at least `threshold` tokens (>= 2), else 0. The
    star's cost per half is bytes on the wire and rows of compute, both linear in tokens, so the
    halves are even."""
    if threshold <= 0 or n_tokens < max(threshold, 2):
        return 0
    return n_tokens // 2


def split_schedule(n_stages: int, n_parts: int = 2) -> list[tuple[int, int]]:
    """Issue order as (part, stage): part p's stage k right after part p-1's stage k."""
    return [(p, k) for k in range(n_stages) for p in range(n_parts)]


Stage = Callable[[int, slice, Any], Any]  # (part, token slice, state) -> new state


def run_split(
    states: Sequence[Any], bounds: Sequence[slice], stages: Sequence[Stage], streams: Sequence[Any] | None = None
) -> list[Any]:
    """Run every stage for every part in `split_schedule` order; returns the final states.

    states[p]: part p's input state (e.g. its rows of the hidden states); bounds[p]: its token
    slice of the step. Without streams the stages run inline. With CUDA streams (one per part),
    part p's work is issued on streams[p]; part p's stage k waits for part p-1's stage k
    (events), and the caller's stream waits for all parts at the end.
    """
    states = list(states)
    if streams is None:
        for p, k in split_schedule(len(stages), len(states)):
            states[p] = stages[k](p, bounds[p], states[p])
        return states

    import torch

    caller = torch.cuda.current_stream()
    done: dict[tuple[int, int], Any] = {}
    for s in streams:
        s.wait_stream(caller)  # inputs were produced on the caller's stream
    for p, k in split_schedule(len(stages), len(states)):
        with torch.cuda.stream(streams[p]):
            if p > 0:
                streams[p].wait_event(done[(p - 1, k)])
            states[p] = stages[k](p, bounds[p], states[p])
            done[(p, k)] = torch.cuda.Event()
            done[(p, k)].record(streams[p])
    for s in streams:
        caller.wait_stream(s)
    for st in states:  # the caching allocator must not reuse these blocks before the caller is done
        _record_stream(st, caller)
    return states


def _record_stream(state: Any, stream: Any) -> None:
    if isinstance(state, (tuple, list)):
        for s in state:
            _record_stream(s, stream)
    elif hasattr(state, "record_stream") and getattr(state, "is_cuda", False):
        state.record_stream(stream)
