"""The one error shape of the API: {"error": {"message", "type", "param", "code"}}.

Every failure a client can see goes through `APIError` or one of the handlers installed by
`install_error_handlers`, so bad input is a 4xx with a one-line message, never a 500 traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpi_node.engine.client import EngineError, ErrorKind

log = logging.getLogger("tpi_node.server")

# The HTTP status of each kind of engine error (the one place the engine meets HTTP).
STATUS_OF_KIND = {
    ErrorKind.INVALID_PROMPT: 400,
    ErrorKind.INVALID_GRAMMAR: 400,
    ErrorKind.CONTEXT_LENGTH: 400,
    ErrorKind.NOT_READY: 503,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.SHUTDOWN: 503,
    ErrorKind.CLUSTER_FAILED: 503,
    ErrorKind.INTERNAL: 500,
}

# OpenAI-style error `type` per HTTP status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def from_engine(cls, exc: EngineError) -> APIError:
        return cls(STATUS_OF_KIND[exc.kind], str(exc), code=exc.code)

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "internal_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """First pydantic error as one line, and the parameter it names (dotted, without 'body')."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    msg = first.get("msg", "invalid value")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        msg = "the request body must be a JSON object"
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(APIError.from_engine(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(APIError.bad_request(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))
