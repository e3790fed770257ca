"""Errors to HTTP, in one place: our exceptions by type, FastAPI's own, and anything left over.

Every error body has OpenAI's shape ``{"error": {message, type, code, param}}``;
ours add their structured fields (needed, limit, …) beside those.
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_tasks.errors import BadInput, BadTools, InvalidRequest, LlamasError, SamplingOutOfRange
from router.core.errors import (
    AdmissionError,
    BodyTooLarge,
    InsufficientFee,
    InsufficientFunds,
    JobNotFinished,
    JobNotQueued,
    MalformedBody,
    NoWorkers,
    OverLimit,
    QueueFull,
    ReceiptMismatch,
    ReferenceConflict,
    TooManyStreams,
    UnknownAccount,
    UnknownJob,
    UnknownModelRequested,
    UnsupportedParameter,
)

log = logging.getLogger(__name__)

#: Errors to HTTP: status and OpenAI-style type, by exception type, first match wins.
ERROR_STATUS: list[tuple[type[BaseException], int, str]] = [
    (UnknownAccount, 401, "invalid_api_key"),
    (InsufficientFunds, 402, "insufficient_funds"),
    (InsufficientFee, 402, "insufficient_fee"),
    (UnknownJob, 404, "not_found"),
    (UnknownModelRequested, 404, "model_not_found"),
    (ReferenceConflict, 409, "reference_conflict"),
    (MalformedBody, 400, "invalid_request_error"),
    (UnsupportedParameter, 400, "invalid_request_error"),
    # OpenAI answers bad tools, tool_choice and tool messages with a 400.
    (BadTools, 400, "invalid_request_error"),
    (JobNotQueued, 409, "job_not_queued"),
    (JobNotFinished, 409, "job_not_finished"),
    # The job's row and its ledger disagree: a bug of ours, not of the request.
    (ReceiptMismatch, 500, "server_error"),
    (QueueFull, 429, "queue_full"),
    (OverLimit, 429, "rate_limit_exceeded"),
    (TooManyStreams, 429, "too_many_streams"),
    (BodyTooLarge, 413, "request_too_large"),
    (NoWorkers, 503, "no_worker"),
    # An embedding's input: empty, too long for the context, not text or tokens (OpenAI's 400).
    (BadInput, 400, "invalid_request_error"),
    (InvalidRequest, 422, "invalid_request_error"),
    (AdmissionError, 422, "invalid_request_error"),
    (LlamasError, 400, "invalid_request_error"),
]


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: an error that quotes one quotes it as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {_finite(k): _finite(v) for k, v in value.items()}
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return value


def error_body(exc: LlamasError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` of the response that refuses a request with ``exc``."""
    status, kind = next((s, k) for t, s, k in ERROR_STATUS if isinstance(exc, t))
    headers = {"X-Needed": str(exc.needed)} if isinstance(exc, InsufficientFee) else {}
    if isinstance(exc, OverLimit):
        headers["Retry-After"] = str(exc.retry_after_s)
    fields = exc.as_dict()
    param = fields.get("param") or (fields.get("name") if isinstance(exc, SamplingOutOfRange) else None)
    body = {"error": {"message": str(exc), "type": kind, "code": type(exc).__name__, "param": param, **fields}}
    return status, _finite(body), headers


def openai_error(status: int, message: str, kind: str, code: str) -> JSONResponse:
    """An error that is none of ours (no structured fields), in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": None}},
                        status_code=status)


async def _llamas_error(request: Request, exc: LlamasError) -> JSONResponse:
    status, body, headers = error_body(exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return openai_error(422, _finite(detail), "invalid_request_error", "invalid")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return openai_error(exc.status_code, str(exc.detail), "invalid_request_error", "http_error")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Redis or the ledger went away after start-up: a 503 the client may retry, not a bug.
    log.error("%s unavailable on %s %s: %s", "Redis" if isinstance(exc, redis.RedisError) else "the ledger",
              request.method, request.url.path, type(exc).__name__)
    return openai_error(503, "the service is temporarily unavailable; try again shortly",
                        "service_unavailable", type(exc).__name__)


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app`` (``LastResort`` is middleware, added by the app factory)."""
    # Starlette types a handler as taking any Exception; ours take the one type they are registered for.
    app.add_exception_handler(LlamasError, _llamas_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(redis.RedisError, _unavailable)
    app.add_exception_handler(OperationalError, _unavailable)


class LastResort:
    """ASGI middleware: an exception nothing else handled is a 500 in OpenAI's shape, logged by type and place.

    Not a FastAPI exception handler: Starlette re-raises what those handle so
    the server logs it, and that traceback would quote the request (a prompt).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            log.error("internal error on %s %s: %s at %s:%s", scope.get("method"), scope.get("path"),
                      type(exc).__name__, where.filename if where else "?", where.lineno if where else "?")
            if scope["type"] == "http" and not started:
                await openai_error(500, "internal error", "server_error", type(exc).__name__)(scope, receive, send)
