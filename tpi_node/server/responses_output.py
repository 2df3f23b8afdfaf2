"""Chat completions -> OpenAI Responses objects and events (the output half of responses_api.py).

`from_chat` turns a chat.completion into a Responses object; `ResponseEvents` turns one choice's
chat.completion.chunk stream into the Responses event stream (see responses_api.py for the order),
every event with its `sequence_number`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from tpi_node.server.protocol import ResponsesRequest

log = logging.getLogger("tpi_node.server")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- answer: chat -> Responses -------------------------------------------------------------------


def _status(finish_reason: str | None) -> tuple[str, str | None]:
    """(response status, incomplete reason) for a chat finish_reason."""
    if finish_reason == "length":
        return "incomplete", "max_output_tokens"
    if finish_reason == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def _usage(use: dict | None) -> dict | None:
    if use is None:
        return None
    cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": use["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": use["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": use["total_tokens"],
    }


def _text_part(text: str, logprobs: list[dict]) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def message_item(item_id: str, text: str, status: str, logprobs: list[dict]) -> dict:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part(text, logprobs)],
    }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def output_items(message: dict, finish_reason: str | None, logprobs: dict | None) -> list[dict]:
    """A chat choice's message -> Responses output items: the text as a message (also when it
    is empty and nothing else came), then one function_call item per tool call."""
    status = "incomplete" if _status(finish_reason)[0] == "incomplete" else "completed"
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    out = []
    if text or not calls:
        out.append(message_item(new_id("msg"), text, status, list((logprobs or {}).get("content") or [])))
    for call in calls:
        fn = call.get("function") or {}
        call_id = call.get("id") or new_id("call")
        out.append(function_call_item(new_id("fc"), call_id, fn.get("name", ""), fn.get("arguments") or "", status))
    return out


class Echo:
    """The request fields a Responses object repeats (the SDK's Response type requires some)."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req, self.model = req, model

    def tools(self) -> list[dict]:
        return [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict,
            }
            for t in self.req.tools or []
        ]

    def tool_choice(self) -> str | dict:
        choice = self.req.tool_choice
        if choice is None:
            return "auto"
        return choice if isinstance(choice, str) else {"type": "function", "name": choice.name}

    def text(self) -> dict:
        fmt = self.req.text.format if self.req.text is not None else None
        if fmt is None:
            return {"format": {"type": "text"}}
        return {"format": fmt.model_dump(by_alias=True, exclude_none=True)}

    def response(
        self,
        rid: str,
        created_at: int,
        *,
        status: str,
        output: list[dict],
        usage: dict | None = None,
        incomplete: str | None = None,
        error: dict | None = None,
    ) -> dict:
        req = self.req
        return {
            "id": rid,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls,
            "metadata": req.metadata or {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": req.temperature,
            "text": self.text(),
            "tool_choice": self.tool_choice(),
            "tools": self.tools(),
            "top_logprobs": req.top_logprobs,
            "top_p": req.top_p,
            "truncation": req.truncation or "disabled",
            "usage": usage,
            "user": req.user,
        }


def from_chat(echo: Echo, rid: str, created_at: int, chat: dict) -> dict:
    """A chat.completion (one choice) -> the Responses object."""
    choice = chat["choices"][0]
    status, incomplete = _status(choice.get("finish_reason"))
    output = output_items(choice.get("message") or {}, choice.get("finish_reason"), choice.get("logprobs"))
    return echo.response(
        rid, created_at, status=status, output=output, usage=_usage(chat.get("usage")), incomplete=incomplete
    )


# -- streaming: chat.completion.chunk SSE -> Responses events -----------------------------------


def _delta_logprobs(entries: list[dict]) -> list[dict]:
    """Chat logprob entries -> the shape of output_text.delta/done events (no bytes)."""
    return [
        {
            "token": e["token"],
            "logprob": e["logprob"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e.get("top_logprobs") or []],
        }
        for e in entries
    ]


def _sse_payloads(chunk: str | bytes) -> list[str]:
    text = chunk.decode() if isinstance(chunk, bytes) else chunk
    return [line[5:].strip() for line in text.split("\n") if line.startswith("data:")]


class ResponseEvents:
    """Turns one chat choice's stream chunks into Responses events (SSE strings), in order."""

    def __init__(self, echo: Echo, rid: str, created_at: int) -> None:
        self.echo, self.rid, self.created_at = echo, rid, created_at
        self.seq = 0
        self.output: list[dict] = []  # every item opened so far, in output_index order
        self.open: dict[int, dict] = {}  # output_index -> item not yet done
        self.message: int | None = None  # output_index of the message taking text now
        self.texts: dict[int, list[str]] = {}  # message output_index -> text pieces
        self.logprobs: dict[int, list[dict]] = {}  # message output_index -> chat logprob entries
        self.calls: dict[int, int] = {}  # chat tool_call index -> output_index
        self.finish_reason: str | None = None
        self.usage: dict | None = None

    def event(self, kind: str, **fields) -> str:
        ev = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(ev, ensure_ascii=False)}\n\n"

    def snapshot(self, status: str, **kw) -> dict:
        return self.echo.response(self.rid, self.created_at, status=status, output=self.output, **kw)

    def start(self) -> list[str]:
        return [
            self.event("response.created", response=self.snapshot("in_progress")),
            self.event("response.in_progress", response=self.snapshot("in_progress")),
        ]

    def _add(self, item: dict) -> tuple[int, str]:
        index = len(self.output)
        self.output.append(item)
        self.open[index] = item
        return index, self.event("response.output_item.added", output_index=index, item=item)

    def _open_message(self) -> list[str]:
        index, added = self._add(
            {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        )
        self.message, self.texts[index], self.logprobs[index] = index, [], []
        part = self.event(
            "response.content_part.added",
            item_id=self.output[index]["id"],
            output_index=index,
            content_index=0,
            part=_text_part("", []),
        )
        return [added, part]

    def text(self, delta: str, logprobs: list[dict]) -> list[str]:
        out = [] if self.message is not None else self._open_message()
        index = self.message
        self.texts[index].append(delta)
        self.logprobs[index].extend(logprobs)
        out.append(
            self.event(
                "response.output_text.delta",
                item_id=self.output[index]["id"],
                output_index=index,
                content_index=0,
                delta=delta,
                logprobs=_delta_logprobs(logprobs),
            )
        )
        return out

    def tool_call(self, tc: dict) -> list[str]:
        fn = tc.get("function") or {}
        out: list[str] = []
        index = self.calls.get(tc.get("index", 0))
        if index is None:
            for done in sorted(self.open):  # items stream one after another: the text, each call
                out += self._close(done, "completed")
            call_id = tc.get("id") or new_id("call")
            index, added = self._add(function_call_item(new_id("fc"), call_id, fn.get("name") or "", "", "in_progress"))
            self.calls[tc.get("index", 0)] = index
            out.append(added)
        elif index not in self.open:  # chat streams one call after another; a late fragment is kept
            log.warning("responses: a tool call fragment after its call was done: %r", tc)
        elif fn.get("name"):
            self.output[index]["name"] += fn["name"]
        if fn.get("arguments"):
            self.output[index]["arguments"] += fn["arguments"]
            out.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=self.output[index]["id"],
                    output_index=index,
                    delta=fn["arguments"],
                )
            )
        return out

    def _close(self, index: int, status: str) -> list[str]:
        item = self.open.pop(index)
        out = []
        if item["type"] == "message":
            text, lps = "".join(self.texts[index]), self.logprobs[index]
            part = _text_part(text, lps)
            done = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self.event("response.output_text.done", **done, text=text, logprobs=_delta_logprobs(lps)))
            out.append(self.event("response.content_part.done", **done, part=part))
            item.update(content=[part], status=status)
            if self.message == index:
                self.message = None
        else:
            item["status"] = status
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        out.append(self.event("response.output_item.done", output_index=index, item=item))
        return out

    def chunk(self, chunk: dict) -> list[str]:
        """One chat.completion.chunk -> its events."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            lps = (choice.get("logprobs") or {}).get("content") or []
            if delta.get("content") or lps:
                out += self.text(delta.get("content") or "", lps)
            for tc in delta.get("tool_calls") or []:
                out += self.tool_call(tc)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def finish(self) -> list[str]:
        status, incomplete = _status(self.finish_reason)
        out = [] if self.output else self._open_message()  # an empty answer is an empty message
        for index in sorted(self.open):
            out += self._close(index, "incomplete" if incomplete else "completed")
        final = self.snapshot(status, usage=_usage(self.usage), incomplete=incomplete)
        out.append(self.event("response.incomplete" if incomplete else "response.completed", response=final))
        return out

    def fail(self, error: dict) -> list[str]:
        """The engine failed mid-stream: an `error` event, then response.failed."""
        message = error.get("message") or "the server failed while generating"
        code = "rate_limit_exceeded" if error.get("type") == "rate_limit_error" else "server_error"
        return [
            self.event("error", code=error.get("code") or code, message=message, param=error.get("param")),
            self.event("response.failed", response=self.snapshot("failed", error={"code": code, "message": message})),
        ]


async def response_stream(events: ResponseEvents, body: AsyncIterator) -> AsyncIterator[str]:
    """The Responses SSE stream over chat's SSE stream; closing it closes chat's (which frees the
    sequence in the engine), also when the client disconnects."""
    try:
        for line in events.start():
            yield line
        async for raw in body:
            for payload in _sse_payloads(raw):
                if payload == "[DONE]":
                    for line in events.finish():
                        yield line
                    return
                chunk = json.loads(payload)
                if chunk.get("error"):
                    for line in events.fail(chunk["error"]):
                        yield line
                    return
                for line in events.chunk(chunk):
                    yield line
        for line in events.fail({"message": "the chat stream ended without [DONE]"}):
            yield line
    except Exception as exc:
        log.exception("responses stream failed")
        for line in events.fail({"message": f"internal error: {type(exc).__name__}"}):
            yield line
    finally:
        close = getattr(body, "aclose", None)
        if close is not None:
            await close()
