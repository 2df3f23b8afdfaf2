"""Tool calling and structured outputs on the default model (SmolLM2-135M), through a real server
and the official openai client: forced calls whose arguments validate against the function's
schema, streamed tool-call deltas that join to the non-streamed call, a tool round trip, JSON
schema outputs that validate (streamed and not, several at once), and the 400s for what cannot be
served. The parsers of the three tool-call families are checked on their own texts."""

from __future__ import annotations

import concurrent.futures as cf
import json

import jsonschema
import openai
import pytest

from tests.api_helpers import serve
from tpi_node.commands.compose import build_local_engine
from tpi_node.server.prompts import PromptEncoder
from tpi_node.server.protocol import ChatCompletionRequest
from tpi_node.server.tools import HERMES, LLAMA3, MISTRAL, ToolStream, ToolUse, parse_tool_calls, template_family

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["engineer", "doctor", "artist"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "skills", "address"],
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def api(smollm2_dir):
    engine = build_local_engine(smollm2_dir, progress=False)
    with serve(engine) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300), engine
    engine.shutdown()


def _args_valid(call, tool: dict) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_required_and_named_tool_choice_give_schema_valid_calls_and_streamed_deltas_join(api):
    client, engine = api
    kw = dict(model=engine.model_name, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=60)
    r = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    _args_valid(call, WEATHER if call.function.name == "get_weather" else TIME)

    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(tool_choice=named, **kw)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    assert all(c.function.name == "get_time" for c in calls)
    for c in calls:
        _args_valid(c, TIME)

    # Streamed: the deltas, joined as the SDK joins them, are the same call.
    joined: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(tool_choice=named, stream=True, **kw):
        for ch in chunk.choices:
            assert not ch.delta.content  # a forced call streams no content
            for d in ch.delta.tool_calls or []:
                slot = joined.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or d.id
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert [(j["name"], json.loads(j["arguments"])) for j in joined.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]
    assert all(j["id"].startswith("call_") for j in joined.values())


def test_a_tool_round_trip_renders_the_call_and_the_result_into_the_next_prompt(api):
    client, engine = api
    r = client.chat.completions.create(
        model=engine.model_name, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    call = r.choices[0].message.tool_calls[0]
    result = json.dumps({"city": "Paris", "temperature": 21, "unit": "celsius", "sky": "sunny"})
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = client.chat.completions.create(
        model=engine.model_name, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=24
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    # the prompt the model saw holds its own call and the tool's result (and, with tool_choice
    # "none", no tool list); with "auto" the tools are listed as well
    enc = PromptEncoder(engine.tokenizer)
    for choice, listed in (("none", False), ("auto", True)):
        req = ChatCompletionRequest(model=engine.model_name, messages=history, tools=[WEATHER], tool_choice=choice)
        ids = enc.chat(req)
        rendered = engine.tokenizer.decode(ids, skip_special_tokens=False)
        assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}' in rendered
        assert f"<tool_response>\n{result}\n</tool_response>" in rendered
        assert ("<tools>" in rendered) == listed
        if choice == "none":
            assert answer.usage.prompt_tokens == len(ids)


def test_json_schema_outputs_validate_streamed_and_not_and_several_at_once(api):
    client, engine = api
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person and describe them."}]
    kw = dict(model=engine.model_name, messages=messages, response_format=fmt, max_tokens=160)
    r = client.chat.completions.create(temperature=0, **kw)
    assert r.choices[0].finish_reason == "stop"
    whole = r.choices[0].message.content
    jsonschema.validate(json.loads(whole), PERSON)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(temperature=0, stream=True, **kw)
        if c.choices
    )
    assert streamed == whole

    def sampled(seed: int) -> list[str]:
        out = client.chat.completions.create(temperature=1.0, seed=seed, n=2, **kw)
        return [c.message.content for c in out.choices if c.finish_reason == "stop"]

    with cf.ThreadPoolExecutor(3) as pool:  # continuous batching: each sequence has its own grammar state
        texts = [t for got in pool.map(sampled, (1, 2, 3)) for t in got]
    assert len(texts) >= 4
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)

    obj = client.chat.completions.create(
        model=engine.model_name,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert obj.choices[0].message.content.startswith("{")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, None),
        ({"response_format": {"type": "yaml"}}, None),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, None),
    ],
)
def test_what_cannot_be_served_is_a_400_in_the_openai_shape(api, extra, param):
    client, engine = api
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=engine.model_name, messages=ASK, max_tokens=4, **extra)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    if param:
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):  # a tool message must say which call it answers
        client.chat.completions.create(
            model=engine.model_name, messages=ASK + [{"role": "tool", "content": "{}"}], max_tokens=4
        )


def test_tool_calls_of_each_family_are_parsed_and_unknown_functions_stay_text():
    names = {"get_weather", "get_time"}
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, names)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    one = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n'
    for cut in ('<tool_call>{"name"', "<tool_call", "<tool_"):  # a second call cut short by max_tokens
        content, calls = parse_tool_calls(one + cut, names)
        assert content is None and len(calls) == 1
    content, calls = parse_tool_calls('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}', names)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "CET"}
    mistral = (
        '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "A"}}, {"name": "get_weather", "arguments": {}}]'
    )
    content, calls = parse_tool_calls(mistral, names)
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert len({c["id"] for c in calls}) == 2
    for plain in ('{"name": "launch_rocket", "arguments": {}}', "No tools needed.", '{"a": 1}'):
        assert parse_tool_calls(plain, names) == (plain, [])

    assert template_family("{{ messages }}") == (HERMES, False)
    assert template_family("{% if tools %}<tool_call>{% endif %}") == (HERMES, True)
    assert template_family("{% if tools %}[TOOL_CALLS]{% endif %}") == (MISTRAL, True)
    assert template_family("{% if tools %}<|python_tag|>{% endif %}") == (LLAMA3, True)


def test_a_stream_holds_back_only_what_may_be_a_tool_call():
    req = ChatCompletionRequest(model="m", messages=ASK, tools=[WEATHER])
    s = ToolStream(ToolUse.of(req))
    sent = s.feed("The answer") + s.feed(" is <tool") + s.feed("_call>\n")
    assert sent == "The answer is "
    s.feed('{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>')
    rest, calls = s.finish()
    assert rest == "" and calls[0]["function"]["name"] == "get_weather"
    plain = ToolStream(ToolUse.of(req))
    assert plain.feed("Hello <") == "Hello " and plain.feed("b>") == "<b>"
    assert plain.finish() == ("", [])


def test_langchain_bind_tools_and_with_structured_output_work_against_the_server(api):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    client, engine = api

    class GetWeather(BaseModel):
        """The current weather in a city."""

        city: str = Field(description="the city")

    class Person(BaseModel):
        name: str = Field(max_length=40)
        age: int = Field(ge=0, le=120)

    llm = ChatOpenAI(
        model=engine.model_name,
        base_url=str(client.base_url),
        api_key="x",
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    msg = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(msg.tool_calls[0]["args"])
    person = llm.with_structured_output(Person, method="json_schema", strict=True).invoke("Invent a person.")
    assert isinstance(person, Person)
    via_tool = llm.with_structured_output(Person, method="function_calling").invoke("Invent a person.")
    assert isinstance(via_tool, Person)
