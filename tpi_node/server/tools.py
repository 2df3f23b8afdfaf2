"""Tool calling: tools into the prompt, tool calls out of the text, and the grammar that forces one.

Three families of tool-call text are understood, whatever the model (parse_tool_calls tries each):
    hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>   (Hermes, Qwen 2/2.5/3, SmolLM3)
    llama3   {"name": ..., "parameters": {...}}  (optionally after <|python_tag|>; Llama 3.1+)
    mistral  [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
A chat template that uses the `tools` variable renders the tools and the tool messages itself, and
its family is read from its text. A template without tools (the default SmolLM2 one) gets the
fallback: a system prompt listing the tools as JSON schemas and asking for hermes-style calls;
earlier assistant calls are rendered as that text, and tool results as user messages wrapped in
<tool_response>. `tool_choice` "required" or a named function forces the family's call syntax with
a grammar (model/grammar.py), so even a small model returns a call whose arguments validate.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from tpi_node.model.grammar import GrammarSpec, closed_objects
from tpi_node.server.protocol import ChatCompletionRequest, NamedToolChoice, Tool

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")

FALLBACK_PROMPT = """You may call functions to help answer. The functions you can call, as JSON schemas:
<tools>
{tools}
</tools>
To call a function, answer with one block per call, each holding a JSON object with the function's
name and its arguments:
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments>}}}}
</tool_call>"""


def template_family(template: str | None) -> tuple[str, bool]:
    """-> (the tool-call family the chat template teaches, whether it renders `tools` itself)."""
    src = template or ""
    takes_tools = re.search(r"\btools\b", src) is not None
    if not takes_tools:
        return HERMES, False
    if "[TOOL_CALLS]" in src:
        return MISTRAL, True
    if "<tool_call>" in src:
        return HERMES, True
    if "<|python_tag|>" in src or "ipython" in src:
        return LLAMA3, True
    return HERMES, True


@dataclass(frozen=True)
class ToolUse:
    """What one chat request does with tools: None when it has none or tool_choice is "none"."""

    tools: tuple[Tool, ...]
    forced: str | None  # None (auto), "*" (required: any tool) or the one function's name
    parallel: bool

    @classmethod
    def of(cls, req: ChatCompletionRequest) -> ToolUse | None:
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none", "auto"):
                raise ValueError("tool_choice needs tools")
            return None
        names = [t.function.name for t in req.tools]
        if len(set(names)) != len(names):
            raise ValueError("tools have duplicate function names")
        if choice == "none":
            return None
        forced = None
        if choice == "required":
            forced = "*"
        elif isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in tools")
            forced = choice.function.name
        return cls(tuple(req.tools), forced, req.parallel_tool_calls is not False)

    @property
    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def grammar(self, family: str) -> GrammarSpec | None:
        """The grammar of a forced call in the family's syntax (None when not forced)."""
        if self.forced is None:
            return None
        tools = [t for t in self.tools if self.forced in ("*", t.function.name)]
        args_key = "parameters" if family == LLAMA3 else "arguments"
        call = (
            {"anyOf": [_call_schema(t, args_key) for t in tools]}
            if len(tools) > 1
            else _call_schema(tools[0], args_key)
        )
        if family == MISTRAL:
            array = {"type": "array", "items": call, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}
            return GrammarSpec("lark", f'start: "[TOOL_CALLS]" %json {json.dumps(array)}\n')
        if family == LLAMA3:
            return GrammarSpec("lark", f"start: %json {json.dumps(call)}\n")
        more = '("\\n" call)*' if self.parallel else ""
        return GrammarSpec(
            "lark", f'start: call {more}\ncall: "<tool_call>\\n" %json {json.dumps(call)} "\\n</tool_call>"\n'
        )


def _call_schema(tool: Tool, args_key: str) -> dict:
    params = closed_objects(tool.function.parameters or {"type": "object", "properties": {}})
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def render_messages(messages: list[dict], req: ChatCompletionRequest, takes_tools: bool) -> tuple[list[dict], dict]:
    """OpenAI messages (as message_dicts made them, tool fields kept) -> (the messages for the
    template, extra template variables)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
    if takes_tools:
        out = []
        for m in messages:
            if m.get("tool_calls"):  # HF templates read arguments as a mapping
                m = {**m, "tool_calls": [_hf_call(c) for c in m["tool_calls"]]}
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(
                f"<tool_call>\n{json.dumps(_hf_call(c)['function'])}\n</tool_call>" for c in m["tool_calls"]
            )
            out.append({"role": "assistant", "content": "\n".join(x for x in (m.get("content"), calls) if x)})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _hf_call(call: dict) -> dict:
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
    except json.JSONDecodeError:
        args = fn["arguments"]
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """The model's text -> (content left over or None, OpenAI tool_calls). Calls of functions
    not in `names` are not calls: the text stays content."""
    calls, content = [], text
    blocks = _HERMES_CALL.findall(text)
    if blocks:
        calls = [c for b in blocks for c in _calls_in(b, names)]
        if calls:  # the text around the calls, less a last call cut short (max_tokens)
            content = _cut_open_call(_HERMES_CALL.sub("", text))
    else:
        body = text.strip()
        for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
            if body.startswith(marker):
                body = body[len(marker) :].strip()
        if body.startswith(("{", "[")):
            calls = _calls_in(body, names)
            if calls:
                content = ""
    content = content.strip()
    return (content or None), [_openai_call(c) for c in calls]


def _cut_open_call(text: str) -> str:
    """The text before a call that was begun and never closed (even its marker cut short)."""
    at = text.find("<tool_call")
    if at >= 0:
        return text[:at]
    marker = "<tool_call>"
    return next((text[:-k] for k in range(len(marker) - 1, 0, -1) if text.endswith(marker[:k])), text)


def _calls_in(text: str, names: set[str]) -> list[dict]:
    """JSON text holding a call or a list of calls -> [{"name", "arguments"}], or [] if any is
    not a call of a known function."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        parts = [p for p in text.split(";") if p.strip()]  # llama3 may separate calls with ';'
        if len(parts) < 2:
            return []
        try:
            value = [json.loads(p) for p in parts]
        except json.JSONDecodeError:
            return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for it in items:
        if not isinstance(it, dict) or it.get("name") not in names:
            return []
        args = it.get("arguments", it.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return []
        calls.append({"name": it["name"], "arguments": args})
    return calls


def _openai_call(call: dict) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
    }


class ToolStream:
    """One streamed choice of a request with tools: passes content through, holding back from the
    point where a tool call may begin (a marker, the start of one, or JSON at the very start)."""

    def __init__(self, use: ToolUse) -> None:
        self.use, self.text, self.sent = use, "", 0

    def feed(self, delta: str) -> str:
        """-> the content that can be sent now."""
        self.text += delta
        if self.use.forced is not None:
            return ""
        cut = self._safe_end()
        out = self.text[self.sent : cut] if cut > self.sent else ""
        self.sent = max(self.sent, cut)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """-> (content still to send, the tool calls) once the choice has ended."""
        content, calls = parse_tool_calls(self.text, self.use.names)
        if not calls:
            return self.text[self.sent :], []
        sent = self.text[: self.sent]
        rest = content[len(sent) :] if content and content.startswith(sent) else ""
        return rest, calls

    def _safe_end(self) -> int:
        body = self.text.lstrip()
        if not body or body[0] in "{[":
            return 0
        cut = len(self.text)
        for m in _MARKERS:
            at = self.text.find(m)
            if at >= 0:
                cut = min(cut, at)
            for k in range(len(m) - 1, 0, -1):
                if self.text.endswith(m[:k]):
                    cut = min(cut, len(self.text) - k)
                    break
        return cut
