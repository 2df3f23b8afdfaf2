"""Pydantic v2 models mirroring the OpenAI API (the subset tpi-node serves).

Requests accept unknown fields (OpenAI adds new ones often; clients send them); the route logs
and ignores them. Numeric ranges follow the OpenAI reference; values outside are a 400.
Responses are plain dicts built in responses.py (their shapes are the OpenAI ones).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# torch.Generator seeds are 64-bit; a wider seed is a 400, not a crash in the sampler.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_N = 16  # choices per request (each is one sequence in the engine)
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_TOOLS = 128
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI; a server also refuses more than its queue bound


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Part):
    include_usage: bool | None = False


class ContentPart(_Part):
    """One part of a message's content; only {"type": "text"} is served (checked in prompts.py)."""

    type: str
    text: str | None = None


class FunctionCall(_Part):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Part):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers


class FunctionDef(_Part):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Part):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="extension: -1 or 0 turn it off")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="extension")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(None)
    n: int | None = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = Field(False, description="extension")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    # the OpenAI default; 0 with echo and logprobs: only the prompt's logprobs (lm-eval's loglikelihood)
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None


class EmbeddingRequest(_Request):
    model: str
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's hidden size is served")
    user: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tpi-node"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- /v1/responses (stateless; served as an adapter over chat completions: responses_api.py) ----


class ResponsesContentPart(_Part):
    """A part of an input message's content; input_text and output_text are served."""

    type: str
    text: str | None = None


class ResponsesInputItem(_Part):
    """A message ({role, content}, type "message" or left out), a `function_call` the model made,
    or the `function_call_output` that answers it (matched by call_id)."""

    type: Literal["message", "function_call", "function_call_output"] | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ResponsesContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None  # function_call: JSON text
    output: str | list[ResponsesContentPart] | None = None  # function_call_output


class ResponsesTool(_Part):
    """Responses' flat tool shape; only type "function" is served."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ResponsesToolChoice(_Part):
    type: str
    name: str | None = None


class ResponsesTextFormat(_Part):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Part):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request):
    model: str
    input: str | list[ResponsesInputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[str] | None = None
    tools: list[ResponsesTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    text: ResponsesText | None = None
    stream: bool | None = False
    store: bool | None = None  # true is refused: this server keeps no responses
    background: bool | None = None  # true is refused
    previous_response_id: str | None = None  # refused (stateless)
    conversation: str | dict | None = None  # refused (stateless)
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # extensions, as on /v1/chat/completions
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    top_k: int | None = Field(None, ge=-1, description="extension: -1 or 0 turn it off")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="extension")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="extension")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="extension")
    stop: str | list[str] | None = Field(None, description="extension")
    ignore_eos: bool | None = Field(False, description="extension")
