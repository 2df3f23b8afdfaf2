"""OpenAI semantics on top of the engine client: prompts, sampling parameters, n, usage,
finish reasons, logprobs, and streaming (SSE ending with `data: [DONE]`).

Order of checks for a request: model (404) -> readiness (503) -> prompt and parameters (400)
-> queue bound (429) -> engine. Errors raised before the first byte of a response are HTTP
statuses; an error after a stream started is sent in-band, then [DONE].
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from tpi_node.engine.client import ClusterNotReady, EngineClient, EngineError, QueueFull, TokenEvent
from tpi_node.model.grammar import GrammarSpec, closed_objects
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.server import responses as R
from tpi_node.server.choices import ChoiceStream, ClientDisconnected, close_all, merged, start_all, unless_disconnected
from tpi_node.server.errors import APIError, error_body
from tpi_node.server.metrics import ServerMetrics
from tpi_node.server.prompts import PromptEncoder
from tpi_node.server.protocol import (
    MAX_STOP,
    SEED_MAX,
    SEED_MIN,
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
)
from tpi_node.server.tools import ToolStream, ToolUse, parse_tool_calls

log = logging.getLogger("tpi_node.server")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _seed_for(seed: int | None, i: int) -> int | None:
    """Choice i of a seeded request samples with seed + i (wrapped into the 64-bit range)."""
    if seed is None:
        return None
    span = SEED_MAX - SEED_MIN + 1
    return (seed + i - SEED_MIN) % span + SEED_MIN


def admit(req, endpoint: str, model_name: str, engine: EngineClient) -> None:
    """The first checks of every endpoint, in order: unknown fields logged, the model (404), the
    cluster's readiness (503)."""
    extra = req.unknown_fields()
    if extra:
        log.info("%s: ignoring unknown fields %s", endpoint, ", ".join(extra))
    if req.model != model_name:
        raise APIError(
            404,
            f"the model {req.model!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )
    if not engine.ready():
        raise ClusterNotReady()


class OpenAIServing:
    def __init__(
        self, engine: EngineClient, tokenizer, model_name: str, metrics: ServerMetrics, max_queue: int
    ) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.max_queue = max_queue
        self.enc = PromptEncoder(tokenizer)

    # -- checks shared by both endpoints ---------------------------------------------------

    def _admit(self, req: _SamplingFields, endpoint: str) -> None:
        admit(req, endpoint, self.model_name, self.engine)
        if req.stream_options is not None and not req.stream:
            raise APIError.bad_request("stream_options is only allowed when stream is true", param="stream_options")

    def _params(
        self, req: _SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None, param: str
    ) -> SamplingParams:
        ctx = int(self.engine.max_context)
        if prompt_len >= ctx or (max_tokens is not None and prompt_len + max_tokens > ctx):
            asked = f" + {max_tokens} max tokens" if max_tokens is not None else ""
            raise APIError.bad_request(
                f"this model's maximum context length is {ctx} tokens; the request has "
                f"{prompt_len} prompt tokens{asked}",
                param=param,
                code="context_length_exceeded",
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > MAX_STOP:
            raise APIError.bad_request(f"at most {MAX_STOP} stop sequences", param="stop")
        vocab = self.enc.vocab_size
        # what the request leaves out: the model's own defaults, else OpenAI's
        dflt = getattr(self.enc.tok, "sampling_defaults", {})
        top_k = req.top_k if req.top_k is not None else dflt.get("top_k", 0)
        top_k = top_k if top_k > 0 else 0
        try:
            return SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else ctx - prompt_len,
                temperature=dflt.get("temperature", 1.0) if req.temperature is None else req.temperature,
                top_p=dflt.get("top_p", 1.0) if req.top_p is None else req.top_p,
                top_k=min(top_k, vocab),
                seed=req.seed,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=req.repetition_penalty or dflt.get("repetition_penalty", 1.0),
                stop=stop,
                ignore_eos=bool(req.ignore_eos),
                logprobs=None if logprobs is None else min(logprobs, vocab),
            )
        except ValueError as exc:
            raise APIError.bad_request(str(exc)) from exc

    def _sequences(
        self, prompts: list[list[int]], params: list[SamplingParams], n: int, request_id: str, arrival: float
    ) -> list[ChoiceStream]:
        """n sequences per prompt; choice index p * n + j samples with seed + j."""
        count = len(prompts) * n
        if self.metrics.active + count > self.max_queue:
            raise QueueFull()
        return [
            ChoiceStream(
                self.engine,
                ids,
                dataclasses.replace(sp, seed=_seed_for(sp.seed, j)),
                f"{request_id}-{p * n + j}",
                p * n + j,
                self.metrics,
                arrival,
            )
            for p, (ids, sp) in enumerate(zip(prompts, params))
            for j in range(n)
        ]

    async def _run(self, request: Request, seqs: list[ChoiceStream], stream: bool) -> bool:
        """Start (and, unless streaming, finish) the sequences. False: the client left."""
        try:
            await unless_disconnected(request, start_all(seqs))
            if not stream:
                await unless_disconnected(request, _collect_all(seqs))
        except ClientDisconnected:
            await close_all(seqs)
            return False
        except BaseException:
            await close_all(seqs)
            raise
        if not stream:
            await close_all(seqs)
        return True

    # -- /v1/chat/completions ----------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        self._admit(req, "chat.completions")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError.bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        try:
            use = ToolUse.of(req)
        except ValueError as exc:
            raise APIError.bad_request(str(exc), param="tool_choice") from None
        prompt = self.enc.chat(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = self._params(req, len(prompt), max_tokens, k, "messages")
        params = dataclasses.replace(params, grammar=self._output_grammar(req, use))
        rid, created = R.new_id("chatcmpl"), R.now()
        seqs = self._sequences([prompt], [params], req.n or 1, rid, arrival)
        self.metrics.prompt_tokens.inc(len(prompt))
        if not await self._run(request, seqs, bool(req.stream)):
            return Response(status_code=499)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._chat_stream(seqs, rid, created, len(prompt), k, usage, use),
                media_type="text/event-stream",
                headers=_SSE_HEADERS,
            )
        choices = []
        for s in seqs:
            lp = R.chat_logprobs(self.enc, s.events) if k is not None else None
            content, calls = parse_tool_calls(s.text, use.names) if use is not None else (s.text, [])
            if calls:
                choices.append(R.chat_choice(s.index, content, "tool_calls", lp, calls))
            else:
                choices.append(R.chat_choice(s.index, s.text, s.finish_reason, lp))
        usage = _usage(len(prompt), seqs, req.n or 1)
        return JSONResponse(R.chat_response(rid, self.model_name, created, choices, usage))

    def _output_grammar(self, req: ChatCompletionRequest, use: ToolUse | None) -> GrammarSpec | None:
        """What the output must follow: a forced tool call's syntax, else the response format."""
        if use is not None and use.forced is not None:
            return use.grammar(self.enc.tool_family)
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return GrammarSpec.json_schema({"type": "object"})
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError.bad_request(
                "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema"
            )
        schema = fmt.json_schema.schema_
        return GrammarSpec.json_schema(closed_objects(schema) if fmt.json_schema.strict else schema)

    def _chat_stream(
        self,
        seqs: list[ChoiceStream],
        rid: str,
        created: int,
        prompt_len: int,
        k: int | None,
        include_usage: bool,
        use: ToolUse | None,
    ) -> AsyncIterator[str]:
        tools = {s.index: ToolStream(use) for s in seqs} if use is not None else {}

        def delta(s: ChoiceStream, ev: TokenEvent) -> dict | None:
            text = tools[s.index].feed(ev.text) if tools else ev.text
            if not text and k is None:
                return None
            return R.chat_delta(s.index, {"content": text}, R.chat_logprobs(self.enc, [ev]) if k is not None else None)

        def end(s: ChoiceStream) -> list[dict]:
            if not tools:
                return [R.chat_delta(s.index, {}, finish_reason=s.finish_reason)]
            rest, calls = tools[s.index].finish()
            out = [R.chat_delta(s.index, {"content": rest})] if rest else []
            for i, c in enumerate(calls):  # OpenAI's shape: the call's head, then its arguments
                head = {"index": i, "id": c["id"], "type": "function", "function": {**c["function"], "arguments": ""}}
                args = {"index": i, "function": {"arguments": c["function"]["arguments"]}}
                out += [R.chat_delta(s.index, {"tool_calls": [head]}), R.chat_delta(s.index, {"tool_calls": [args]})]
            return out + [R.chat_delta(s.index, {}, finish_reason="tool_calls" if calls else s.finish_reason)]

        shape = _StreamShape(
            chunk=lambda choices: R.chat_chunk(rid, self.model_name, created, choices, include_usage),
            head=lambda s: R.chat_delta(s.index, {"role": "assistant", "content": ""}),
            delta=delta,
            end=end,
            every_token=k is not None,
            choices_per_prompt=len(seqs),
        )
        return _sse_stream(_chunks(shape, seqs, prompt_len if include_usage else None), seqs)

    # -- /v1/completions ---------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        arrival = time.perf_counter()
        self._admit(req, "completions")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise APIError.bad_request("best_of must equal n (ranking is not supported)", param="best_of")
        if req.suffix:
            raise APIError.bad_request("suffix is not supported", param="suffix")
        prompts = self.enc.completion(req.prompt)
        echo_k = req.logprobs if req.echo else None  # echo + logprobs: the prompt tokens' logprobs first
        params = [self._params(req, len(ids), req.max_tokens, req.logprobs, "prompt") for ids in prompts]
        params = [dataclasses.replace(p, prompt_logprobs=echo_k) for p in params]
        rid, created = R.new_id("cmpl"), R.now()
        seqs = self._sequences(prompts, params, n, rid, arrival)
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        echoes = [self.enc.decode(p) if req.echo else "" for p in prompts]
        if not await self._run(request, seqs, bool(req.stream)):
            return Response(status_code=499)

        def echo_logprobs(s: ChoiceStream) -> dict | None:  # known once the sequence started
            if echo_k is None:
                return None
            ids = prompts[s.index // n]
            return R.prompt_logprobs(self.enc, ids, s.prompt_logprobs or [None] * len(ids))

        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            echo_of = [(echoes[s.index // n], echo_logprobs(s)) for s in seqs]
            return StreamingResponse(
                self._completion_stream(seqs, rid, created, prompt_tokens, req.logprobs, usage, echo_of, n),
                media_type="text/event-stream",
                headers=_SSE_HEADERS,
            )
        choices = []
        for s in seqs:
            echo = echoes[s.index // n]
            lp = R.completion_logprobs(self.enc, s.events, len(echo)) if req.logprobs is not None else None
            if echo_k is not None:
                lp = R.joined_logprobs(echo_logprobs(s), lp)
            choices.append(R.completion_choice(s.index, echo + s.text, s.finish_reason, lp))
        use = _usage(prompt_tokens, seqs, n)
        return JSONResponse(R.completion_response(rid, self.model_name, created, choices, use))

    def _completion_stream(
        self,
        seqs: list[ChoiceStream],
        rid: str,
        created: int,
        prompt_tokens: int,
        k: int | None,
        include_usage: bool,
        echoes: list[tuple[str, dict | None]],
        n: int,
    ) -> AsyncIterator[str]:
        """`echoes`: each choice's echoed prompt and, with logprobs, the prompt's logprobs (sent
        in the choice's first chunk)."""
        offsets = {s.index: len(e) for s, (e, _) in zip(seqs, echoes)}  # text_offset of the next token
        echo_of = {s.index: e for s, e in zip(seqs, echoes)}

        def delta(s: ChoiceStream, ev: TokenEvent) -> dict:
            lp = R.completion_logprobs(self.enc, [ev], offsets[s.index]) if k is not None else None
            offsets[s.index] += len(ev.text)
            return R.completion_choice(s.index, ev.text, None, lp)

        def head(s: ChoiceStream) -> dict | None:
            text, lp = echo_of[s.index]
            return R.completion_choice(s.index, text, None, lp) if text or lp else None

        shape = _StreamShape(
            chunk=lambda choices: R.completion_chunk(rid, self.model_name, created, choices, include_usage),
            head=head,
            delta=delta,
            end=lambda s: [R.completion_choice(s.index, "", s.finish_reason, None)],
            every_token=k is not None,
            choices_per_prompt=n,
        )
        return _sse_stream(_chunks(shape, seqs, prompt_tokens if include_usage else None), seqs)


@dataclass(frozen=True)
class _StreamShape:
    """What one endpoint's stream chunks look like (chat and completions differ only here)."""

    chunk: Callable[[list[dict]], dict]  # the envelope around a chunk's choices
    head: Callable[[ChoiceStream], dict | None]  # a choice's first chunk (role, echo), if any
    delta: Callable[[ChoiceStream, TokenEvent], dict | None]  # a choice's chunk for one token (None: none)
    end: Callable[[ChoiceStream], list[dict]]  # a choice's last chunks (tool calls, finish_reason)
    every_token: bool  # a chunk even for a token with no text yet (logprobs asked)
    choices_per_prompt: int  # n


def _usage(prompt_tokens: int, seqs: list[ChoiceStream], n: int) -> dict:
    """Usage of a request: every choice's tokens; the prompt's cached tokens as the first choice
    of each prompt found them (its other choices share the prompt, counted once)."""
    cached = sum(s.cached_tokens for s in seqs if s.index % n == 0)
    return R.usage(prompt_tokens, sum(len(s.events) for s in seqs), cached)


async def _chunks(shape: _StreamShape, seqs: list[ChoiceStream], usage_prompt: int | None) -> AsyncIterator[str]:
    """The SSE lines of a stream: heads, then every choice's events as they come, then usage."""
    for s in seqs:
        head = shape.head(s)
        if head is not None:
            yield R.sse(shape.chunk([head]))
    async for seq, ev in merged(seqs):
        if ev is None:
            for last in shape.end(seq):
                yield R.sse(shape.chunk([last]))
        elif ev.text or shape.every_token:
            d = shape.delta(seq, ev)
            if d is not None:
                yield R.sse(shape.chunk([d]))
    if usage_prompt is not None:
        last = shape.chunk([])
        last["usage"] = _usage(usage_prompt, seqs, shape.choices_per_prompt)
        yield R.sse(last)


async def _collect_all(seqs: list[ChoiceStream]) -> None:
    if len(seqs) == 1:
        await seqs[0].collect()
    else:
        await asyncio.gather(*(s.collect() for s in seqs))


async def _sse_stream(body: AsyncIterator[str], seqs: list[ChoiceStream]) -> AsyncIterator[str]:
    """Wrap a chunk generator: in-band error then [DONE] on failure; always close the engine
    sequences (a disconnect cancels this generator, and the finally frees their KV cache)."""
    try:
        try:
            async for line in body:
                yield line
        except EngineError as exc:
            yield R.sse(APIError.from_engine(exc).body())
        except Exception as exc:
            log.exception("stream failed")
            yield R.sse(error_body(500, f"internal error: {type(exc).__name__}"))
        yield R.sse("[DONE]")
    finally:
        await close_all(seqs)
