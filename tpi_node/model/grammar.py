"""Constrained decoding: a grammar a sequence's output must follow, as a mask over the vocabulary.

A `GrammarSpec` is what a request asks for (a JSON schema for `response_format`, a Lark grammar
for forced tool calls); `GrammarCompiler.compile` turns it into a `TokenConstraint`, one per
sequence, which says before each token which ids are allowed and follows the tokens sampled.

The matching is llguidance's (a Rust Earley parser with a token trie; measured with
scripts/bench_structured.py, tens of microseconds per token on the default model's 49k vocabulary
and ~1 ms to compile a JSON schema). Its mask is a bitmask of int32 words, bit i of word w
allowing token 32 * w + i.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch


class GrammarError(ValueError):
    """A grammar that cannot be compiled (an invalid or unsupported JSON schema)."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: Literal["json_schema", "lark"]
    source: str  # the JSON schema as JSON text, or the Lark grammar

    @classmethod
    def json_schema(cls, schema: dict) -> GrammarSpec:
        return cls("json_schema", json.dumps(schema))  # key order kept: it is the properties' order


def closed_objects(schema):
    """A copy of a JSON schema whose objects allow only the properties they name (an explicit
    additionalProperties is kept), as OpenAI's strict mode has it."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


class TokenConstraint:
    """One sequence's grammar state. `allowed()` -> bool [vocab]; `accept(token)` advances it."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._m, self.vocab_size = matcher, vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next (end-of-sequence ids included when
        the output may end here)."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(np.bool_))

    def accept(self, token_id: int) -> bool:
        """Follow a sampled token; False when the grammar did not allow it."""
        return bool(self._m.consume_token(token_id)) and not self._m.is_error()

    @property
    def finished(self) -> bool:
        """Nothing but the end of the output is allowed any more."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return self._m.get_error()


class GrammarCompiler:
    """Compiles specs against one tokenizer. The tokenizer's trie is built on first use (~0.4 s
    for a 49k vocabulary), so a server that never constrains output never pays for it; so is its
    JSON (`tokenizer_json` is called then: SmolLM2's is a 3.5 MB string, and serialising it leaves
    a few MiB more in the heap)."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_ids: list[int]) -> None:
        self._tokenizer_json, self.vocab_size, self._eos = tokenizer_json, vocab_size, sorted(eos_ids)
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            import llguidance  # imported here: only servers that constrain output need it

            self._tok = llguidance.LLTokenizer(self._tokenizer_json(), n_vocab=self.vocab_size, eos_token=self._eos)
        return self._tok

    def compile(self, spec: GrammarSpec) -> TokenConstraint:
        import llguidance

        try:
            if spec.kind == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    spec.source, defaults={"whitespace_flexible": False}
                )
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(spec.source)
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
        tok = self._tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise GrammarError(f"unsupported {spec.kind.replace('_', ' ')}: {messages[0]}")
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return TokenConstraint(matcher, self.vocab_size)
