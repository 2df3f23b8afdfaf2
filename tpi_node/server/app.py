"""The FastAPI app of the master: OpenAI-compatible routes, /health and /metrics.

    app = create_app(engine, tokenizer, model_name="tiny-llama", api_key=None,
                     cluster_info=lambda: {"nodes": [...]}, stats=engine.stats)
    uvicorn.run(app, host="127.0.0.1", port=8000)

`stats` (default: `engine.stats` when the engine has one) is described in metrics.py.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from tpi_node import __version__
from tpi_node.engine.client import ClusterNotReady, EngineClient
from tpi_node.engine.limits import DEFAULT_LIMITS
from tpi_node.server.embeddings import EmbeddingServing
from tpi_node.server.errors import APIError, error_response, install_error_handlers
from tpi_node.server.metrics import ServerMetrics, StatsFn
from tpi_node.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponsesRequest,
)
from tpi_node.server.responses_api import create_response
from tpi_node.server.serving import OpenAIServing

# sequences admitted (waiting + running) before new requests get 429: the engine's own queue bound
DEFAULT_MAX_QUEUE = DEFAULT_LIMITS.max_queue

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 429, 503)}
_COUNTED_PATHS = {
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/health",
    "/metrics",
}


class _CountRequests:
    """ASGI middleware: tpi_requests_total{endpoint, status} for every HTTP request."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _COUNTED_PATHS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()


def api_key_check(api_key: str | None) -> Callable:
    """A dependency that answers 401 unless the request has `Authorization: Bearer <api_key>`
    (nothing is checked without an api_key)."""
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key / TPI_API_KEY")

    async def check(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if creds is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not _key_matches(creds.credentials, api_key):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    return check


def _key_matches(given: str, api_key: str) -> bool:
    return secrets.compare_digest(given.encode(), api_key.encode())


def create_app(
    engine: EngineClient,
    tokenizer,
    *,
    model_name: str,
    api_key: str | None = None,
    public_metrics: bool = False,
    cluster_info: Callable[[], dict] | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    stats: StatsFn | None = None,
) -> FastAPI:
    app = FastAPI(title="tpi-node", version=__version__, description="OpenAI-compatible API of a tpi-node cluster")
    metrics = ServerMetrics(stats if stats is not None else getattr(engine, "stats", None))
    serving = OpenAIServing(engine, tokenizer, model_name, metrics, max_queue)
    embeddings = EmbeddingServing(engine, serving.enc, model_name, metrics, max_queue)
    created = int(time.time())
    install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    app.state.serving, app.state.metrics = serving, metrics

    auth = Depends(api_key_check(api_key))
    v1 = APIRouter(prefix="/v1", dependencies=[auth], responses=_ERRORS)

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, max_model_len=int(engine.max_context))

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @v1.get("/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return card()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @v1.post("/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await create_response(serving, body, request)

    @v1.post("/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await embeddings.create(body, request)

    app.include_router(v1)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(request: Request) -> Response:
        """Liveness for anyone; the nodes, their addresses and the plan only with the API key."""
        if not engine.ready():
            return error_response(APIError.from_engine(ClusterNotReady()))
        given = request.headers.get("authorization", "")
        if api_key is not None and not (given.startswith("Bearer ") and _key_matches(given[7:], api_key)):
            return JSONResponse({"status": "ok"})
        info = dict(cluster_info() if cluster_info is not None else {})
        info.setdefault("nodes", [])
        return JSONResponse({"status": "ok", "model": model_name, **info})

    @app.get("/metrics", dependencies=[] if public_metrics else [auth])
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _openapi_without_422(app)
    return app


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents validation errors as 422; this API answers them with 400."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
