"""/v1/responses, stateless: OpenAI's Responses API as an adapter over chat completions.

A Responses request becomes a ChatCompletionRequest (instructions -> a system message first,
input items -> messages, function_call / function_call_output items -> an assistant message with
tool_calls / a tool message, flat function tools -> chat tools, text.format -> response_format),
runs through `OpenAIServing.chat`, and its answer is turned back into a Responses object, or its
chat.completion.chunk stream into the Responses event stream:

    response.created, response.in_progress,
    per message:        output_item.added, content_part.added, output_text.delta..., output_text.done,
                        content_part.done, output_item.done
    per function call:  output_item.added, function_call_arguments.delta..., function_call_arguments.done,
                        output_item.done
    response.completed (response.incomplete when max_output_tokens cut it; response.failed after
    an `error` event when the engine failed mid-stream)

Every event carries `sequence_number`; the stream has no `[DONE]` (OpenAI sends none here).
Nothing is stored: `store: true`, `previous_response_id`, `conversation` and `background: true`
are a 400. `truncation: "auto"` is accepted but does nothing (an input too long is a 400 either way).
"""

from __future__ import annotations

import json
import time

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import Request

from tpi_node.server.errors import APIError
from tpi_node.server.protocol import (
    ChatCompletionRequest,
    ResponsesContentPart,
    ResponsesRequest,
    ResponsesToolChoice,
)
from tpi_node.server.responses_output import Echo, ResponseEvents, from_chat, new_id, response_stream
from tpi_node.server.serving import OpenAIServing, admit

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TEXT_PARTS = ("input_text", "output_text")
LOGPROBS_INCLUDE = "message.output_text.logprobs"


# -- request: Responses -> chat ------------------------------------------------------------------


def _text(content: str | list[ResponsesContentPart] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type not in _TEXT_PARTS or part.text is None:
            raise APIError.bad_request(
                f"content part type {part.type!r} is not supported (only input_text and output_text)",
                param=f"{param}.{j}",
            )
        texts.append(part.text)
    return "".join(texts)


def _messages(req: ResponsesRequest) -> list[dict]:
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    if not req.input:
        raise APIError.bad_request("input must not be empty", param="input")
    for i, item in enumerate(req.input):
        kind = item.type or ("message" if item.role is not None else None)
        at = f"input.{i}"
        if kind is None:
            raise APIError.bad_request(f"{at}: an input item needs a role (a message) or a type", param=at)
        if kind == "message":
            if item.role is None:
                raise APIError.bad_request(f"{at}.role: a message needs a role", param=f"{at}.role")
            messages.append({"role": item.role, "content": _text(item.content, f"{at}.content")})
        elif kind == "function_call":
            for field in ("call_id", "name"):
                if not getattr(item, field):
                    raise APIError.bad_request(f"{at}.{field}: a function_call needs it", param=f"{at}.{field}")
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:  # function_call_output
            if not item.call_id:
                raise APIError.bad_request(
                    f"{at}.call_id: a function_call_output needs the call_id it answers", param=f"{at}.call_id"
                )
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, f"{at}.output")}
            )
    if not messages:
        raise APIError.bad_request("input must not be empty", param="input")
    return messages


def _tools(req: ResponsesRequest) -> list[dict] | None:
    if req.tools is None:
        return None
    tools = []
    for i, t in enumerate(req.tools):
        if t.type != "function":
            raise APIError.bad_request(
                f"tool type {t.type!r} is not supported (only 'function': this server runs no hosted tools)",
                param=f"tools.{i}.type",
            )
        if not t.name:
            raise APIError.bad_request(f"tools.{i}.name: a function tool needs a name", param=f"tools.{i}.name")
        fn = {"name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict}
        tools.append({"type": "function", "function": fn})
    return tools


def _tool_choice(choice: str | ResponsesToolChoice | None) -> str | dict | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function" or not choice.name:
        raise APIError.bad_request(
            "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(req: ResponsesRequest) -> dict | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if not fmt.name:
        raise APIError.bad_request("text.format.name: a json_schema format needs a name", param="text.format.name")
    schema = {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": schema}


def wants_logprobs(req: ResponsesRequest) -> bool:
    return req.top_logprobs is not None or LOGPROBS_INCLUDE in (req.include or ())


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request that answers `req` (400 for what chat cannot express)."""
    body: dict = {
        "model": req.model,
        "messages": _messages(req),
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "top_k": req.top_k,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "stop": req.stop,
        "ignore_eos": req.ignore_eos,
        "user": req.user,
        "stream": bool(req.stream),
        "tools": _tools(req),
        "tool_choice": _tool_choice(req.tool_choice),
        "response_format": _response_format(req),
    }
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if wants_logprobs(req):
        body["logprobs"], body["top_logprobs"] = True, req.top_logprobs or 0
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = responses_param(".".join(str(p) for p in first.get("loc", ())) or None)
        msg = first.get("msg", "invalid value")
        raise APIError.bad_request(f"{param}: {msg}" if param else msg, param=param) from exc


_PARAM_NAMES = (  # a chat parameter -> the Responses parameter it came from
    ("messages", "input"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("tool_choice.function", "tool_choice"),
)


def responses_param(param: str | None) -> str | None:
    """Name a chat error's parameter as the Responses request spells it."""
    if param is None:
        return None
    if param.startswith("tools.") and ".function" in param:
        return param.replace(".function", "", 1)
    for old, new in _PARAM_NAMES:
        if param == old or param.startswith(old + "."):
            return new if old == "messages" else new + param[len(old) :]  # message indices differ
    return param


def _refuse_state(req: ResponsesRequest) -> None:
    stateless = "this server is stateless and keeps no responses"
    if req.store:
        raise APIError.bad_request(f"store: true is not supported: {stateless}; send store: false", param="store")
    if req.previous_response_id is not None:
        raise APIError.bad_request(
            f"previous_response_id is not supported: {stateless}; send the whole conversation in input",
            param="previous_response_id",
        )
    if req.conversation is not None:
        raise APIError.bad_request(
            f"conversation is not supported: {stateless}; send the whole conversation in input", param="conversation"
        )
    if req.background:
        raise APIError.bad_request(
            f"background: true is not supported: {stateless}; use stream: true for long answers", param="background"
        )


# -- the route -----------------------------------------------------------------------------------


async def create_response(serving: OpenAIServing, req: ResponsesRequest, request: Request) -> Response:
    """POST /v1/responses. Order of checks as on the other routes: model (404) -> readiness (503)
    -> request (400) -> queue (429) -> engine."""
    admit(req, "responses", serving.model_name, serving.engine)
    _refuse_state(req)
    chat = chat_request(req)
    try:
        answer = await serving.chat(chat, request)
    except APIError as exc:
        exc.param = responses_param(exc.param)
        raise
    echo, rid, created_at = Echo(req, serving.model_name), new_id("resp"), int(time.time())
    if isinstance(answer, StreamingResponse):
        stream = response_stream(ResponseEvents(echo, rid, created_at), answer.body_iterator)
        return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)
    if answer.status_code != 200:  # the client left (499)
        return answer
    return JSONResponse(from_chat(echo, rid, created_at, json.loads(answer.body)))
