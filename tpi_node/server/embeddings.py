"""/v1/embeddings in OpenAI's shape.

An input's embedding is the MEAN over all its token positions of the model's final-normed hidden
states (after the last RMSNorm, the vector lm_head would read), scaled to unit L2 norm. Texts are
tokenized as /v1/completions tokenizes a prompt (the tokenizer's own special tokens, if it adds
any); token-id inputs are used as given. Every input is one prefill-only engine sequence, all of a
request submitted together, so they share steps with each other and with generation.

`encoding_format: "base64"` sends each vector as OpenAI does: its little-endian float32 bytes,
base64-encoded. `dimensions` is accepted only when it equals the hidden size (no truncation).
"""

from __future__ import annotations

import base64
import struct

from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from tpi_node.engine.client import EngineClient, QueueFull
from tpi_node.server import responses as R
from tpi_node.server.choices import ClientDisconnected, unless_disconnected
from tpi_node.server.errors import APIError
from tpi_node.server.metrics import ServerMetrics
from tpi_node.server.prompts import PromptEncoder
from tpi_node.server.protocol import MAX_EMBEDDING_INPUTS, EmbeddingRequest
from tpi_node.server.serving import admit


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class EmbeddingServing:
    def __init__(
        self, engine: EngineClient, enc: PromptEncoder, model_name: str, metrics: ServerMetrics, max_queue: int
    ) -> None:
        self.engine, self.enc, self.model_name = engine, enc, model_name
        self.metrics, self.max_queue = metrics, max_queue

    def _inputs(self, req: EmbeddingRequest) -> list[list[int]]:
        """Checks in the order of the other endpoints: model (404), readiness (503), input (400)."""
        admit(req, "embeddings", self.model_name, self.engine)
        size = int(self.engine.hidden_size)
        if req.dimensions is not None and req.dimensions != size:
            raise APIError.bad_request(
                f"dimensions must be {size} (the model's hidden size) or left out", param="dimensions"
            )
        if isinstance(req.input, list) and len(req.input) > min(MAX_EMBEDDING_INPUTS, self.max_queue):
            raise APIError.bad_request(
                f"at most {min(MAX_EMBEDDING_INPUTS, self.max_queue)} inputs per request", param="input"
            )
        try:
            prompts = self.enc.completion(req.input)
        except APIError as exc:
            exc.param = "input"
            raise
        ctx = int(self.engine.max_context)
        for i, ids in enumerate(prompts):
            if len(ids) >= ctx:
                raise APIError.bad_request(
                    f"input {i} has {len(ids)} tokens; this model's maximum context length is {ctx} tokens",
                    param="input",
                    code="context_length_exceeded",
                )
        return prompts

    async def create(self, req: EmbeddingRequest, request: Request) -> Response:
        prompts = self._inputs(req)
        if self.metrics.active + len(prompts) > self.max_queue:
            raise QueueFull()
        tokens = sum(len(p) for p in prompts)
        self.metrics.prompt_tokens.inc(tokens)
        for _ in prompts:
            self.metrics.sequence_started()
        try:
            vectors = await unless_disconnected(request, self.engine.embed(prompts, R.new_id("embd")))
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            for _ in prompts:
                self.metrics.sequence_finished()
        b64 = req.encoding_format == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": encode_base64(v) if b64 else v}
            for i, v in enumerate(vectors)
        ]
        use = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": self.model_name, "usage": use})
