"""The HTTP gateway: ``uvicorn router.api:app``.

OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` (plain and
SSE streaming) and ``/v1/models`` with Bearer API keys, plus ``/info``,
``/jobs/{id}``, ``/health`` and ``/metrics`` (Prometheus). It runs inside the herder's trust domain and
calls the same admission code as the herder's tasks, directly.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_tasks import stream as token_stream
from llama_tasks.constants import NOTIFY_PREFIX, RESPONSE_PREFIX
from llama_tasks.errors import InvalidRequest, LlamasError, SamplingOutOfRange
from router import choices as completions
from router import dispatch, openai_request, openai_shapes
from router.errors import (
    AdmissionError,
    InsufficientFee,
    InsufficientFunds,
    JobNotQueued,
    MalformedBody,
    NoWorkers,
    QueueFull,
    ReferenceConflict,
    UnknownAccount,
    UnknownJob,
    UnknownModelRequested,
    UnsupportedParameter,
)
from router.metrics import ServiceCollector
from router.preflight import GatewayPreflight
from router.request import Submission
from router.request import check as check_request
from router.service import HerderService

log = logging.getLogger(__name__)

#: How long one wait on a token stream blocks before the gateway checks that its client is still there.
FOLLOW_BLOCK_MS = 250
#: Pause between tries while Redis does not answer.
REDIS_RETRY_S = 0.5

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
    (JobNotQueued, 409, "job_not_queued"),
    (QueueFull, 429, "queue_full"),
    (NoWorkers, 503, "no_worker"),
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
    status, kind = next((s, k) for t, s, k in ERROR_STATUS if isinstance(exc, t))
    headers = {"X-Needed": str(exc.needed)} if isinstance(exc, InsufficientFee) else {}
    fields = exc.as_dict()
    param = fields.get("param") or (fields.get("name") if isinstance(exc, SamplingOutOfRange) else None)
    body = {"error": {"message": str(exc), "type": kind, "code": type(exc).__name__, "param": param, **fields}}
    return status, _finite(body), headers


def _openai_error(status: int, message: str, kind: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, "param": None}},
                        status_code=status)


def _usage(resp: dict[str, Any]) -> dict[str, Any]:
    # completion_tokens is already the sum over every choice.
    p, c = resp.get("prompt_tokens") or 0, resp.get("completion_tokens") or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": resp.get("cached_tokens") or 0},
            "offered": resp.get("offered"), "charged": resp.get("charged"), "refunded": resp.get("refunded")}


def _choices(resp: dict[str, Any]) -> list[dict[str, Any]]:
    # A response a herder wrote before choices existed carries one completion's fields.
    return cast(list[dict[str, Any]], resp.get("choices")) or completions.stored(
        None, resp.get("text"), resp.get("finish_reason"), resp.get("completion_tokens"))


def create_app(service_factory: Callable[[], HerderService] | None = None) -> FastAPI:
    """Build the gateway around a ``HerderService`` (the process's own by default)."""
    app = FastAPI(title="llamas", version="1", docs_url="/docs")
    app.add_middleware(LastResort)

    def service() -> HerderService:
        if service_factory is not None:
            return service_factory()
        from router.tasks import service as default_service

        return default_service()

    state: dict[str, aioredis.Redis] = {}

    def aredis() -> aioredis.Redis:
        if "r" not in state:
            state["r"] = aioredis.Redis.from_url(service().settings.redis_url)
        return state["r"]

    @app.exception_handler(LlamasError)
    async def _llamas_error(request: Request, exc: LlamasError) -> JSONResponse:
        status, body, headers = error_body(exc)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return _openai_error(422, _finite(detail), "invalid_request_error", "invalid")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _openai_error(exc.status_code, str(exc.detail), "invalid_request_error", "http_error")

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis or the ledger went away after start-up: a 503 the client may retry, not a bug.
        log.error("%s unavailable on %s %s: %s", "Redis" if isinstance(exc, redis.RedisError) else "the ledger",
                  request.method, request.url.path, type(exc).__name__)
        return _openai_error(503, "the service is temporarily unavailable; try again shortly",
                             "service_unavailable", type(exc).__name__)

    def api_key(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnknownAccount("(no Bearer API key)")
        return key.strip()

    async def admit(request: Request, sub: Submission) -> dict[str, Any]:
        svc = service()
        key = api_key(request)
        # Bad input is a 422 whatever the herd is doing (admission checks it again, as every path does).
        check_request(sub, svc.settings.max_tokens_cap)
        if not dispatch.capacity(await run_in_threadpool(svc.herd)).get(sub.model):
            known = await run_in_threadpool(svc.counter.models)
            # An unknown model is a 404 even when nothing is running.
            exc: LlamasError = (UnknownModelRequested(sub.model, sorted(known)) if sub.model not in known
                                else NoWorkers(sub.model))
            svc.refused(exc)
            raise exc
        return await run_in_threadpool(svc.submit, key, sub)

    async def cancel_on_disconnect(key: str, job_id: str) -> None:
        """Nobody is listening any more: a queued job ends with a full refund, a
        running one stops at its next step and is charged for what it generated."""
        try:
            await run_in_threadpool(service().cancel, key, job_id)
        except (JobNotQueued, UnknownJob):
            pass  # already finished
        except redis.RedisError:
            pass  # cancelled in the ledger; only telling the job's other channels failed

    async def final_from_ledger(key: str, job_id: str) -> dict[str, Any] | None:
        """The job's response if the ledger says it has ended (Redis may have lost it, or be away)."""
        doc = await run_in_threadpool(service().status, key, job_id)
        return cast(dict[str, Any] | None, doc.get("response"))

    async def wait_response(request: Request, key: str, job_id: str) -> dict[str, Any] | None:
        """The final response, or None if the client went away (its queued job is cancelled)."""
        r = aredis()
        while True:
            try:
                raw = await r.get(RESPONSE_PREFIX + job_id)
                if raw:
                    return cast(dict[str, Any], json.loads(raw))
            except redis.RedisError:
                # Redis is away: the job goes on (and is charged) regardless, and the
                # ledger knows when it ends, so keep waiting rather than fail the client.
                final = await final_from_ledger(key, job_id)
                if final is not None:
                    return final
                await anyio.sleep(REDIS_RETRY_S)
            if await request.is_disconnected():
                await cancel_on_disconnect(key, job_id)
                return None
            try:
                await r.blpop([NOTIFY_PREFIX + job_id], timeout=0.5)
            except redis.RedisError:
                await anyio.sleep(REDIS_RETRY_S)

    async def follow(request: Request, job_id: str) -> AsyncIterator[dict[str, str]]:
        """The job's stream as a reader should see it; ends early if the client goes away."""
        r, last, follower = aredis(), "0-0", token_stream.TextFollower()
        while True:
            try:
                batch = cast(list[Any], await r.xread({token_stream.key(job_id): last},
                                                      block=FOLLOW_BLOCK_MS, count=100))
            except redis.RedisError:
                # Redis is away (or restarted empty): stop streaming; the caller
                # then waits for the final response, from the ledger if need be.
                return
            for entry_id, raw in (batch[0][1] if batch else []):
                last = entry_id
                for event in follower.feed({k.decode(): v.decode() for k, v in raw.items()}):
                    yield event
                    if event["event"] in ("end", "error"):
                        return
            if not batch:
                if await request.is_disconnected():
                    yield {"event": "disconnected"}
                    return
                # Nothing new: the job may have ended without generating (expired, cancelled).
                if await r.exists(RESPONSE_PREFIX + job_id):
                    return

    async def completion(request: Request, sub: Submission, stream: bool, include_usage: bool,
                         chat: bool) -> Any:
        key = api_key(request)
        doc = await admit(request, sub)
        job_id = doc["job_id"]
        shapes = openai_shapes.Shapes(job_id, sub.model, chat, int(time.time()), len(sub.prompt or ""))
        if not stream:
            resp = await wait_response(request, key, job_id)
            if resp is None:
                return _openai_error(499, "client disconnected", "invalid_request_error", "client_closed")
            if resp["status"] != "done":
                return _failed(resp)
            return shapes.final(_choices(resp), _usage(resp))

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                if chat:
                    yield shapes.sse(shapes.role_chunk())
                async for event in follow(request, job_id):
                    if event["event"] == "token":
                        yield shapes.sse(shapes.text_chunk(event["text"]))
                    elif event["event"] == "restart":
                        yield shapes.sse(shapes.restart_chunk(int(event["attempt"] or 0)))
                    elif event["event"] == "disconnected":
                        return
                resp = await wait_response(request, key, job_id)
                finished = True
                if resp is None:
                    return
                if resp["status"] != "done":
                    err = {"error": {"message": resp.get("message"), "type": resp.get("error"), "code": resp["status"]}}
                    yield shapes.sse(err)
                else:
                    for chunk in shapes.closing_chunks(resp["finish_reason"], _usage(resp), include_usage):
                        yield shapes.sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    # The client went away before the end: refund it if the job had not started.
                    # Shielded, because this cleanup runs inside the scope that was just cancelled.
                    with anyio.CancelScope(shield=True):
                        await cancel_on_disconnect(key, job_id)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Llamas-Job": job_id})

    async def openai_call(request: Request, chat: bool) -> Any:
        body = openai_request.parse_body(await request.body())
        sub = openai_request.submission(body, request.headers, chat=chat)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await completion(request, sub, bool(body.get("stream")), include_usage, chat)

    @app.post("/v1/chat/completions", openapi_extra=openai_request.openapi_body(chat=True))
    async def chat_completions(request: Request) -> Any:
        return await openai_call(request, chat=True)

    @app.post("/v1/completions", openapi_extra=openai_request.openapi_body(chat=False))
    async def completions(request: Request) -> Any:
        return await openai_call(request, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = await run_in_threadpool(service().info)
        return {"object": "list", "data": [
            {"id": m["name"], "object": "model", "created": 0, "owned_by": info["name"],
             "llamas_model_id": m["id"], "slots": m["slots"],
             # The most prompt + max_tokens one request may ask for: one slot's context.
             "context_length": m["context_per_job"]} for m in info["models"]
        ]}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return await run_in_threadpool(service().info)

    @app.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> dict[str, Any]:
        return await run_in_threadpool(service().status, api_key(request), job_id)

    @app.delete("/jobs/{job_id}")
    async def cancel(request: Request, job_id: str) -> dict[str, Any]:
        return await run_in_threadpool(service().cancel, api_key(request), job_id)

    registry = CollectorRegistry()
    collector: dict[str, ServiceCollector] = {}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        admin_key = service().settings.admin_key
        if admin_key:
            # Revenue and refusals are business data: only the operator's key may read them.
            given = request.headers.get("authorization", "").partition(" ")[2].strip()
            if not hmac.compare_digest(given.encode(), admin_key.encode()):
                return _openai_error(401, "/metrics needs the operator's key (LLAMAS_ADMIN_KEY) as a Bearer token",
                                     "invalid_api_key", "UnknownAccount")
        if not collector:
            collector["c"] = ServiceCollector(service())
            registry.register(collector["c"])
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        svc = service()
        checks: dict[str, Any] = {}
        try:
            await aredis().ping()
            checks["broker"] = {"state": "ok"}
        except Exception as exc:  # any failure means "down"; the message says which
            checks["broker"] = {"state": "down", "error": str(exc)}
        try:
            await run_in_threadpool(_ping_ledger, svc)
            checks["ledger"] = {"state": "ok"}
        except Exception as exc:
            checks["ledger"] = {"state": "down", "error": str(exc)}
        try:
            herd = await run_in_threadpool(svc.herd)
            slots = sum(int(w.get("slots", 0)) for w in herd)
            checks["herd"] = {"state": "ok" if slots else "empty", "workers": len(herd), "slots": slots}
        except Exception as exc:
            checks["herd"] = {"state": "down", "error": str(exc)}
        healthy = all(checks[c]["state"] == "ok" for c in ("broker", "ledger"))
        status = "ok" if healthy and checks["herd"]["state"] == "ok" else ("degraded" if healthy else "down")
        return JSONResponse({"status": status, **checks}, status_code=200 if healthy else 503)

    return app


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
                await _openai_error(500, "internal error", "server_error", type(exc).__name__)(scope, receive, send)


def _ping_ledger(svc: HerderService) -> None:
    with svc.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _failed(resp: dict[str, Any]) -> JSONResponse:
    status = {"expired": 408, "cancelled": 409}.get(resp["status"], 500)
    return JSONResponse({"error": {"message": resp.get("message"), "type": resp.get("error"),
                                   "code": resp["status"], "job_id": resp["job_id"]}}, status_code=status)


app = create_app()
# Only the process's own gateway checks its key and Redis at start-up (tests build theirs with create_app).
app.add_middleware(GatewayPreflight)
