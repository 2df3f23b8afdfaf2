"""The narrow interface between the HTTP layer and the engine.

The server never touches tensors: it renders prompts to token ids with the tokenizer, calls
`generate`, and turns the events into OpenAI responses. Tests can swap the engine for a fake.
Engine errors say what kind of failure they are; the server maps each kind to an HTTP status
(server/errors.py), so nothing below the server knows about HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from tpi_node.errors import TpiError
from tpi_node.model.sampling_params import SamplingParams


class ErrorKind(Enum):
    """What went wrong; the value is the OpenAI-style error `code` clients see."""

    INVALID_PROMPT = "invalid_prompt"
    INVALID_GRAMMAR = "invalid_grammar"  # a response format or tool schema that cannot be enforced
    CONTEXT_LENGTH = "context_length_exceeded"
    NOT_READY = "cluster_not_ready"
    QUEUE_FULL = "queue_full"
    SHUTDOWN = "shutdown"
    CLUSTER_FAILED = "cluster_error"
    INTERNAL = "engine_error"


class EngineError(TpiError):
    """A generation failed for a reason the client should see."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def code(self) -> str:
        return self.kind.value


class ClusterNotReady(EngineError):
    def __init__(self, message: str = "the cluster is not ready") -> None:
        super().__init__(message, ErrorKind.NOT_READY)


class QueueFull(EngineError):
    def __init__(self, message: str = "too many requests are waiting; try again later") -> None:
        super().__init__(message, ErrorKind.QUEUE_FULL)


# The logprob of one prompt token given the tokens before it, and the top k there ((token id,
# logprob), best first; None when k was not asked). None for the first prompt token (no context).
PromptLogprob = tuple[float, list[tuple[int, float]] | None] | None


@dataclass
class TokenEvent:
    """One step of one sequence. `text` is the new, UTF-8-complete text (may be empty while a
    multi-byte character or a possible stop string is held back).

    A prefill-only sequence (max_tokens 0, or an embedding) ends with ONE event that carries no
    token: token_id None, text "", finish_reason "length"; it is not a completion token."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first
    finish_reason: str | None = None  # "stop" | "length" | None
    cached_tokens: int | None = None  # first event only: prompt tokens taken from the prefix cache
    # first event only, when SamplingParams.prompt_logprobs was set: one entry per prompt token
    prompt_logprobs: list[PromptLogprob] | None = None
    embedding: list[float] | None = None  # an embedding sequence's one event (Engine.embed)


class EngineClient(Protocol):
    model_name: str
    max_context: int
    hidden_size: int  # the length of an embedding

    def ready(self) -> bool: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        """Stream tokens of one sequence; closing the iterator early cancels the sequence and
        frees its KV cache on every node. Raises EngineError subclasses."""
        ...

    async def embed(self, prompts: list[list[int]], request_id: str = "") -> list[list[float]]:
        """One embedding per prompt (pooled final hidden states, L2-normalised), the prompts run
        together as prefill-only sequences. Raises EngineError subclasses."""
        ...
