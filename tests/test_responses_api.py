"""/v1/responses (stateless, an adapter over chat completions), with the official openai client
against a real server on SmolLM2: the greedy answer equals the chat completion of the same
messages, streams join to it with OpenAI's event sequence, max_output_tokens gives an incomplete
response, stateful requests and unknown models get the OpenAI error shape. The request and
stream mapping (tools, function calls, text.format) is checked without the engine, every object
and event strictly against the openai package's own types."""

from __future__ import annotations

import json

import openai
import pytest
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tests.api_helpers import engine_idle, serve, wait_until
from tpi_node.commands.compose import build_local_engine
from tpi_node.server.errors import APIError
from tpi_node.server.protocol import ResponsesRequest
from tpi_node.server.responses_api import chat_request, responses_param
from tpi_node.server.responses_output import Echo, ResponseEvents, from_chat

try:  # openai >= 3 ships on httpx2; older clients on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

EVENT = TypeAdapter(ResponseStreamEvent)
INSTRUCTIONS = "You are a helpful assistant. Answer in one short sentence."
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = build_local_engine(smollm2_dir, progress=False)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serve(engine) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def _chat(client, model, messages, max_tokens):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)


def _sse_events(url: str, body: dict) -> list[dict]:
    """The raw events of a streamed response, each checked against the SDK's event types."""
    events = []
    with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                ev = json.loads(line[6:])
                assert ev["type"] == kind
                EVENT.validate_python(ev)  # strict: every required field, the right types
                events.append(ev)
    return events


# -- through the server --------------------------------------------------------------------------


def test_a_response_is_the_chat_completion_of_the_same_messages(url, client, engine):
    model = engine.model_name
    r = client.responses.create(
        model=model, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=24, temperature=0
    )
    c = _chat(client, model, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}], 24)
    want = c.choices[0].message.content
    assert want and r.output_text == want
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text" and r.output[0].content[0].annotations == []
    assert r.status == ("incomplete" if c.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == c.usage.prompt_tokens and r.usage.output_tokens == c.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == INSTRUCTIONS and r.max_output_tokens == 24 and r.temperature == 0
    assert r.tools == [] and r.tool_choice == "auto" and r.parallel_tool_calls is True
    assert r.text.format.type == "text"
    raw = httpx.post(
        url + "/v1/responses",
        json={
            "model": model,
            "instructions": INSTRUCTIONS,
            "input": QUESTION,
            "max_output_tokens": 24,
            "temperature": 0,
        },
        timeout=120,
    ).json()
    SDKResponse.model_validate(raw)  # strict, not the client's lenient construction
    assert raw["output"][0]["content"][0]["text"] == want


def test_instructions_and_a_message_list(client, engine):
    model = engine.model_name
    history = [
        {"role": "user", "content": "Hi! My name is Ann and I live in Paris."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Nice to meet you, Ann!"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]},
    ]
    r = client.responses.create(
        model=model, instructions=INSTRUCTIONS, input=history, max_output_tokens=16, temperature=0
    )
    messages = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": history[0]["content"]},
        {"role": "assistant", "content": "Nice to meet you, Ann!"},
        {"role": "user", "content": "What is my name?"},
    ]
    c = _chat(client, model, messages, 16)
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens


def test_a_stream_joins_to_the_response_with_the_event_sequence(url, client, engine):
    model = engine.model_name
    body = {"model": model, "instructions": INSTRUCTIONS, "input": QUESTION, "max_output_tokens": 24, "temperature": 0}
    whole = client.responses.create(**body)
    events = _sse_events(url, body)
    kinds = [e["type"] for e in events]
    last = "response.completed" if whole.status == "completed" else "response.incomplete"
    n = kinds.count("response.output_text.delta")
    assert n >= 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(e["item_id"] == item_id and e["output_index"] == 0 and e["content_index"] == 0 for e in deltas)
    joined = "".join(e["delta"] for e in deltas)
    assert joined == whole.output_text == events[-4]["text"]
    assert events[-2]["item"]["content"][0]["text"] == joined
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["status"] == whole.status
    assert final["output"][0]["id"] == item_id and final["output"][0]["content"][0]["text"] == joined
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert final["usage"][key] == getattr(whole.usage, key)

    # the SDK: typed events from create(stream=True), and the stream helper's final response
    typed = list(client.responses.create(**body, stream=True))
    assert "".join(e.delta for e in typed if e.type == "response.output_text.delta") == joined
    assert typed[-1].type == last and typed[-1].response.output_text == joined
    with client.responses.stream(**body) as stream:
        assert stream.get_final_response().output_text == joined


def test_max_output_tokens_gives_an_incomplete_response(url, client, engine):
    body = {"model": engine.model_name, "input": "Tell me a long story about a dragon.", "max_output_tokens": 3}
    r = client.responses.create(**body, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete" and r.output_text
    events = _sse_events(url, {**body, "temperature": 0})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == r.output_text


def _error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"store": True}, "store", "stateless"),
        ({"previous_response_id": "resp_123"}, "previous_response_id", "stateless"),
        ({"background": True}, "background", "stateless"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "not supported"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0",
            "",
        ),
        ({"input": []}, "input", "empty"),
        ({"max_output_tokens": 0}, "max_output_tokens", ""),
        ({"temperature": 3}, "temperature", ""),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name", "name"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name", ""),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice", ""),
    ],
)
def test_bad_and_stateful_requests_are_400(url, engine, extra, param, words):
    body = {"model": engine.model_name, "input": "Hello", "max_output_tokens": 2, **extra}
    err = _error(httpx.post(url + "/v1/responses", json=body, timeout=30), 400, param)
    assert err["type"] == "invalid_request_error" and words in err["message"]


def test_store_true_through_the_client_and_a_wrong_model(client, url, engine):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=engine.model_name, input="Hi", store=True)
    assert e.value.status_code == 400 and "stateless" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-17", input="Hi")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    _error(httpx.post(url + "/v1/responses", json={"model": "gpt-17", "input": "Hi"}, timeout=30), 404, "model")


def test_unknown_fields_are_ignored_and_the_context_error_names_input(url, engine):
    body = {"model": engine.model_name, "input": "Hi", "max_output_tokens": 2, "reasoning": {"effort": None}, "x": 1}
    assert httpx.post(url + "/v1/responses", json=body, timeout=60).status_code == 200
    long = {"model": engine.model_name, "input": "word " * (int(engine.max_context) + 10)}
    err = _error(httpx.post(url + "/v1/responses", json=long, timeout=60), 400, "input")
    assert err["code"] == "context_length_exceeded"


def test_leaving_a_stream_frees_the_sequence(url, engine):
    body = {"model": engine.model_name, "input": "Count to one thousand.", "max_output_tokens": 400, "stream": True}
    with httpx.stream("POST", url + "/v1/responses", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if "response.output_text.delta" in line:
                break
    wait_until(lambda: engine_idle(engine), timeout=30, what="the sequence to be freed")


def test_top_logprobs_reach_the_output_text(client, engine):
    r = client.responses.create(
        model=engine.model_name, input=QUESTION, max_output_tokens=4, temperature=0, top_logprobs=2
    )
    lps = r.output[0].content[0].logprobs
    assert len(lps) == r.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in lps)
    assert "".join(lp.token for lp in lps) == r.output_text


def test_function_calls_and_json_schema_through_the_responses_route(client, engine):
    """Tools and text.format reach chat's enforcement: a required call validates against its
    schema, streamed argument deltas join to the non-streamed call, the tool's output comes back
    as input and the model answers; a json_schema answer validates."""
    jsonschema = pytest.importorskip("jsonschema")
    model = engine.model_name
    tools = [{"type": "function", "name": "get_weather", "description": "Get the weather", "parameters": WEATHER}]
    body = {"model": model, "input": "Weather in Paris?", "tools": tools, "max_output_tokens": 96, "temperature": 0}
    for choice in ({"type": "function", "name": "get_weather"}, "required"):
        r = client.responses.create(**body, tool_choice=choice)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and r.status == "completed", [o.model_dump() for o in r.output]
        assert r.tool_choice == choice if isinstance(choice, str) else r.tool_choice.name == "get_weather"
        for call in calls:
            assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
            jsonschema.validate(json.loads(call.arguments), WEATHER)
        assert len({c.call_id for c in calls}) == len(calls)
    events = list(client.responses.create(**body, tool_choice="required", stream=True))
    args: dict[int, str] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            args[e.output_index] = args.get(e.output_index, "") + e.delta
    want = [c.arguments for c in calls]  # the non-streamed "required" calls
    assert [args[i] for i in sorted(args)] == want
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == want
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(c.name, c.arguments) for c in done] == [("get_weather", a) for a in want]
    assert [(c.call_id, c.arguments) for c in events[-1].response.output if c.type == "function_call"] == [
        (c.call_id, c.arguments) for c in done
    ]
    kinds = [e.type for e in events if e.type.startswith("response.output_item")]
    assert kinds == ["response.output_item.added", "response.output_item.done"] * (len(kinds) // 2)  # one at a time

    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": want[0]},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C and sunny"},
    ]
    answer = client.responses.create(model=model, input=history, tools=tools, max_output_tokens=30, temperature=0)
    assert answer.output_text and answer.output[0].type == "message"

    fmt = {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}}
    r = client.responses.create(model=model, input="Weather in Paris?", text=fmt, max_output_tokens=96, temperature=0)
    jsonschema.validate(json.loads(r.output_text), WEATHER)
    assert r.text.format.type == "json_schema" and r.text.format.name == "weather"


# -- the mapping, without the engine -------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}


def _req(**body) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **body})


def test_a_tool_round_trip_maps_to_chat_messages_tools_and_response_format():
    req = _req(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "21 C"}]},
        ],
        tools=[{"type": "function", "name": "get_weather", "description": "d", "parameters": WEATHER, "strict": True}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}},
        max_output_tokens=7,
        top_p=0.5,
        seed=3,
        stream=True,
    )
    chat = chat_request(req)
    got = chat.model_dump(exclude_none=True, by_alias=True)
    assert got["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "21 C", "tool_call_id": "call_2"},
    ]
    assert got["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "d", "parameters": WEATHER, "strict": True},
        }
    ]
    assert got["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert got["parallel_tool_calls"] is False
    assert got["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": WEATHER, "strict": True},
    }
    assert got["max_completion_tokens"] == 7 and got["top_p"] == 0.5 and got["seed"] == 3
    assert got["stream"] is True and got["stream_options"] == {"include_usage": True}
    assert chat_request(_req(input="x", text={"format": {"type": "json_object"}})).response_format.type == "json_object"
    assert chat_request(_req(input="x", text={"format": {"type": "text"}})).response_format is None
    with pytest.raises(APIError) as e:
        chat_request(_req(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]))
    assert e.value.param == "input.0.call_id"


def test_chat_parameter_names_become_responses_names():
    assert responses_param("messages.3.content") == "input"
    assert responses_param("max_completion_tokens") == "max_output_tokens"
    assert responses_param("response_format.json_schema.schema") == "text.format.schema"
    assert responses_param("tools.2.function.parameters") == "tools.2.parameters"
    assert responses_param("tool_choice.function.name") == "tool_choice.name"
    assert responses_param("temperature") == "temperature"


def test_a_chat_answer_with_tool_calls_becomes_function_call_items():
    req = _req(input="x", tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}])
    chat = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 4,
            "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    r = SDKResponse.model_validate(from_chat(Echo(req, "m"), "resp_1", 1, chat))
    assert r.status == "completed" and r.output_text == ""
    [call] = r.output
    assert (call.type, call.call_id, call.name, call.arguments) == (
        "function_call",
        "call_a",
        "get_weather",
        '{"city":"Oslo"}',
    )
    assert r.tools[0].name == "get_weather" and r.tools[0].parameters == WEATHER


def _stream(events: ResponseEvents, chunks: list[dict]) -> list[dict]:
    lines = events.start()
    for c in chunks:
        lines += events.chunk(c)
    lines += events.finish()
    out = []
    for line in lines:
        kind, data = line.split("\n")[:2]
        ev = json.loads(data[len("data: ") :])
        assert kind == f"event: {ev['type']}"
        EVENT.validate_python(ev)
        out.append(ev)
    return out


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"object": "chat.completion.chunk", "choices": choices, "usage": usage}


def test_streamed_tool_call_deltas_become_function_call_events():
    def call(i, cid=None, name=None, args=None):
        fn = {k: v for k, v in (("name", name), ("arguments", args)) if v is not None}
        return _chunk(
            {"tool_calls": [{"index": i, **({"id": cid, "type": "function"} if cid else {}), "function": fn}]}
        )

    use = {
        "prompt_tokens": 5,
        "completion_tokens": 9,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Let me"}),
        _chunk({"content": " check."}),
        call(0, "call_a", "get_weather", ""),
        call(0, args='{"city": '),
        call(0, args='"Paris"}'),
        call(1, "call_b", "get_weather", '{"city": "Rome"}'),
        _chunk({}, finish="tool_calls"),
        _chunk(usage=use),
    ]
    evs = _stream(ResponseEvents(Echo(_req(input="x"), "m"), "resp_1", 1), chunks)
    assert [e["type"] for e in evs] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = SDKResponse.model_validate(evs[-1]["response"])
    assert final.output_text == "Let me check."
    assert [(o.type, getattr(o, "call_id", None)) for o in final.output] == [
        ("message", None),
        ("function_call", "call_a"),
        ("function_call", "call_b"),
    ]
    assert final.output[1].arguments == '{"city": "Paris"}' and final.output[2].arguments == '{"city": "Rome"}'
    assert final.usage.input_tokens_details.cached_tokens == 2 and final.usage.output_tokens == 9
    done = {e["output_index"]: e["arguments"] for e in evs if e["type"] == "response.function_call_arguments.done"}
    assert done == {1: '{"city": "Paris"}', 2: '{"city": "Rome"}'}


def test_an_empty_answer_is_an_empty_message_and_an_engine_error_fails_the_response():
    evs = _stream(ResponseEvents(Echo(_req(input="x"), "m"), "resp_1", 1), [_chunk({}, finish="stop")])
    assert SDKResponse.model_validate(evs[-1]["response"]).output[0].content[0].text == ""
    events = ResponseEvents(Echo(_req(input="x"), "m"), "resp_2", 1)
    events.start()
    events.chunk(_chunk({"content": "Hi"}))
    failed = [json.loads(x.split("\n")[1][6:]) for x in events.fail({"message": "cluster lost a node", "code": "x"})]
    assert [e["type"] for e in failed] == ["error", "response.failed"]
    for e in failed:
        EVENT.validate_python(e)
    assert (
        failed[1]["response"]["status"] == "failed"
        and failed[1]["response"]["error"]["message"] == "cluster lost a node"
    )
