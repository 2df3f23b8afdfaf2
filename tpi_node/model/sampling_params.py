"""What a request asks of the sampler. Shared by the engine, the CLI and the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from tpi_node.model.grammar import GrammarSpec


@dataclass
class SamplingParams:
    max_tokens: int = 256  # 0: prefill only (prompt logprobs), one final event without a token
    temperature: float = 1.0  # 0 -> greedy (argmax)
    top_p: float = 1.0  # nucleus; 1.0 -> off
    top_k: int = 0  # 0 -> off
    seed: int | None = None  # same seed, same text
    presence_penalty: float = 0.0  # OpenAI semantics, applied to generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL semantics over prompt + generated; 1.0 -> off
    stop: tuple[str, ...] = ()  # stop strings (matched on text, also across tokens)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: chosen token only; k: also the top k
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs, as `logprobs` (no prefix cache)
    n: int = 1  # handled above the engine (n independent sequences)
    grammar: GrammarSpec | None = None  # constrained decoding: the output follows this grammar
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError("prompt_logprobs must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
