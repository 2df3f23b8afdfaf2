"""How much work the engine takes on at once. One definition, read by the engine's scheduler and
by the memory budget (engine/budget.py), so the two can never disagree."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLimits:
    max_running: int = 32  # sequences decoding at once
    max_queue: int = 256  # waiting requests before 429
    prefill_chunk: int = 512  # tokens of one prompt per step (bounds attention memory)
    max_step_tokens: int = 1024  # tokens of all sequences per step


DEFAULT_LIMITS = EngineLimits()

# Tokens per block of the paged KV cache (engine/kv_cache.py, engine/blocks.py).
BLOCK_TOKENS = 16
