"""Prompts to token ids, and token ids to the strings OpenAI's logprobs show.

Every tokenizer failure on user input (a chat template that rejects the conversation, text the
tokenizer cannot encode, token ids out of range) becomes a 400 here, never a 500.
"""

from __future__ import annotations

import inspect
import re

from tpi_node.model.tokenizer import IncrementalDecoder
from tpi_node.server.errors import APIError
from tpi_node.server.protocol import ChatCompletionRequest, ChatMessage
from tpi_node.server.tools import render_messages, template_family

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece byte-fallback tokens


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2, Llama 3, Qwen) spells byte b as one printable character; invert it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_DECODER = _gpt2_byte_decoder()


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the {"role", "content": str} dicts chat templates expect."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError.bad_request(
                        f"content part type {part.type!r} is not supported (only 'text')",
                        param=f"messages.{i}.content.{j}",
                    )
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if m.role == "developer" else m.role
        msg = {"role": role, "content": content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError.bad_request("a tool message needs tool_call_id", param=f"messages.{i}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


class PromptEncoder:
    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        params = inspect.signature(tokenizer.encode).parameters
        # A rendered chat template already holds BOS; encoding must not add a second one.
        self._no_specials = next((k for k in ("add_special_tokens", "add_bos") if k in params), None)
        self._piece_cache: dict[int, tuple[str, list[int]]] = {}
        to_id = getattr(tokenizer, "token_to_id", None)
        self._byte_level = bool(to_id and to_id("Ġ") is not None)  # "Ġ" spells byte 0x20
        # the tool-call syntax the model's chat template teaches, and whether it renders tools
        self.tool_family, self._template_takes_tools = template_family(getattr(tokenizer, "chat_template", None))

    def _encode(self, text: str, specials: bool) -> list[int]:
        try:
            if self._no_specials is None:
                return list(self.tok.encode(text))
            return list(self.tok.encode(text, **{self._no_specials: specials}))
        except Exception as exc:  # e.g. lone surrogates the tokenizer cannot represent
            raise APIError.bad_request(f"cannot tokenize the prompt: {exc}") from exc

    def chat(self, req: ChatCompletionRequest) -> list[int]:
        messages, variables = render_messages(message_dicts(req.messages), req, self._template_takes_tools)
        try:
            rendered = self.tok.apply_chat_template(messages, add_generation_prompt=True, **variables)
        except APIError:
            raise
        except Exception as exc:  # jinja templates raise on conversations they refuse
            raise APIError.bad_request(f"cannot apply the chat template: {exc}", param="messages") from exc
        ids = self._encode(rendered, specials=False) if isinstance(rendered, str) else list(rendered)
        if not ids:
            raise APIError.bad_request("the rendered prompt is empty", param="messages")
        return ids

    def completion(self, prompt) -> list[list[int]]:
        """prompt: str | list[str] | list[int] | list[list[int]] -> one id list per prompt."""
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError.bad_request("prompt must not be empty", param="prompt")
        out = []
        for p in prompts:
            ids = self._encode(p, specials=True) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError.bad_request("prompt must not be empty", param="prompt")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError.bad_request(
                    f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="prompt"
                )
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text as logprobs show it, and its UTF-8 bytes (exact for byte tokens)."""
        hit = self._piece_cache.get(token_id)
        if hit is None:
            piece = self.tok.id_to_token(token_id) or ""
            m = _BYTE_PIECE.match(piece)
            if self._byte_level and piece and all(c in _BYTE_DECODER for c in piece):
                raw = [_BYTE_DECODER[c] for c in piece]
                text = bytes(raw).decode("utf-8", "replace")
            elif m:
                raw = [int(m.group(1), 16)]
                text = bytes(raw).decode("utf-8", "replace")
            else:
                text = self.tok.decode([token_id])
                raw = list(text.encode("utf-8", "replace"))
            hit = (text, raw)
            if len(self._piece_cache) < 65536:
                self._piece_cache[token_id] = hit
        return hit

    def text_offsets(self, ids: list[int]) -> list[int]:
        """Where each token's text starts in decode(ids) (an echoed prompt's text_offset),
        decoded incrementally so a long prompt costs linear time."""
        decoder, offsets, at = IncrementalDecoder(self.tok), [], 0
        for t in ids:
            offsets.append(at)
            at += len(decoder.push(t))
        return offsets
