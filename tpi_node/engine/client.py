"""The narrow interface between the HTTP layer and the engine.

The server never touches tensors: it renders prompts to token ids with the tokenizer, calls
`generate`, and turns the events into OpenAI responses. Tests can swap the engine for a fake.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from tpi_node.model.sampling_params import SamplingParams


class EngineError(RuntimeError):
    """A generation failed for a reason the client should see (code is an OpenAI-style code)."""

    def __init__(self, message: str, code: str = "engine_error", status: int = 500) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ClusterNotReady(EngineError):
    def __init__(self, message: str = "the cluster is not ready") -> None:
        super().__init__(message, code="cluster_not_ready", status=503)


class QueueFull(EngineError):
    def __init__(self, message: str = "too many requests are waiting; try again later") -> None:
        super().__init__(message, code="queue_full", status=429)


@dataclass
class TokenEvent:
    """One step of one sequence. `text` is the new, UTF-8-complete text (may be empty while a
    multi-byte character or a possible stop string is held back)."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None   # (token id, logprob), best first
    finish_reason: str | None = None                       # "stop" | "length" | None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0


class EngineClient(Protocol):
    model_name: str
    max_context: int

    def ready(self) -> bool: ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[TokenEvent]:
        """Stream tokens of one sequence; closing the iterator early cancels the sequence and
        frees its KV cache on every node. Raises EngineError subclasses."""
        ...
