"""OpenAI response and stream-chunk shapes, as plain dicts (json.dumps-ready).

Chat logprobs:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}
Completion logprobs:  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}], "text_offset": [...]}
"""

from __future__ import annotations

import json
import time
import uuid

from tpi_node.engine.client import TokenEvent
from tpi_node.server.prompts import PromptEncoder


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; `cached_tokens`: prompt tokens whose KV came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


def _lp(x: float | None) -> float:
    # -inf is not JSON; OpenAI clients expect a number.
    return max(float(x), -9999.0) if x is not None else -9999.0


def chat_logprobs(enc: PromptEncoder, events: list[TokenEvent]) -> dict:
    content = []
    for ev in events:
        token, raw = enc.piece(ev.token_id)
        tops = []
        for tid, lp in ev.top_logprobs or []:
            t, b = enc.piece(tid)
            tops.append({"token": t, "logprob": _lp(lp), "bytes": b})
        content.append({"token": token, "logprob": _lp(ev.logprob), "bytes": raw, "top_logprobs": tops})
    return {"content": content, "refusal": None}


def completion_logprobs(enc: PromptEncoder, events: list[TokenEvent], offset: int) -> dict:
    """`offset`: length of the text before the first of these tokens (for text_offset)."""
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        token, _ = enc.piece(ev.token_id)
        tokens.append(token)
        lps.append(_lp(ev.logprob))
        tops.append({enc.piece(tid)[0]: _lp(lp) for tid, lp in ev.top_logprobs or []})
        offsets.append(offset)
        offset += len(ev.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(enc: PromptEncoder, ids: list[int], lps: list) -> dict:
    """An echoed prompt's part of the completion logprobs: its tokens, each one's logprob given
    those before it (null for the first: nothing precedes it), the top ones there, text_offset."""
    tokens, values, tops = [], [], []
    for tid, lp in zip(ids, lps):
        tokens.append(enc.piece(tid)[0])
        values.append(None if lp is None else _lp(lp[0]))
        tops.append(None if lp is None else {enc.piece(t)[0]: _lp(v) for t, v in lp[1] or []})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": enc.text_offsets(ids)}


def joined_logprobs(first: dict, then: dict) -> dict:
    return {k: first[k] + then[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _envelope(obj: str, rid: str, model: str, created: int, choices: list[dict], **extra) -> dict:
    """The fields every response and stream chunk of the API share."""
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
        "system_fingerprint": None,
    }


def chat_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return _envelope("chat.completion", rid, model, created, choices, usage=use)


def chat_choice(
    index: int, text: str | None, finish_reason: str, logprobs: dict | None, tool_calls: list[dict] | None = None
) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return _envelope("text_completion", rid, model, created, choices, usage=use)


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], with_usage: bool) -> dict:
    """A stream chunk; `usage` is null on every chunk but the last when the client asked for it."""
    return _envelope("chat.completion.chunk", rid, model, created, choices, **({"usage": None} if with_usage else {}))


def chat_delta(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(rid: str, model: str, created: int, choices: list[dict], with_usage: bool) -> dict:
    return _envelope("text_completion", rid, model, created, choices, **({"usage": None} if with_usage else {}))
