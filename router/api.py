"""The HTTP gateway: ``uvicorn router.api:app``.

OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` (plain and
SSE streaming) and ``/v1/models`` with Bearer API keys, plus ``/info``,
``/jobs/{id}``, ``/health`` and ``/metrics`` (Prometheus). It runs inside the herder's trust domain and
calls the same admission code as the herder's tasks, directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import text

from llama_tasks import stream as token_stream
from llama_tasks.constants import NOTIFY_PREFIX, RESPONSE_PREFIX
from llama_tasks.errors import InvalidRequest, LlamasError
from llama_tasks.job import (
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
)
from router import dispatch
from router.admission import Submission
from router.errors import (
    AdmissionError,
    InsufficientFee,
    InsufficientFunds,
    JobNotQueued,
    NoWorkers,
    QueueFull,
    ReferenceConflict,
    UnknownAccount,
    UnknownJob,
    UnknownModelRequested,
)
from router.metrics import ServiceCollector
from router.service import HerderService

#: Errors to HTTP: status and OpenAI-style type, by exception type, first match wins.
ERROR_STATUS: list[tuple[type[BaseException], int, str]] = [
    (UnknownAccount, 401, "invalid_api_key"),
    (InsufficientFunds, 402, "insufficient_funds"),
    (InsufficientFee, 402, "insufficient_fee"),
    (UnknownJob, 404, "not_found"),
    (UnknownModelRequested, 404, "model_not_found"),
    (ReferenceConflict, 409, "reference_conflict"),
    (JobNotQueued, 409, "job_not_queued"),
    (QueueFull, 429, "queue_full"),
    (NoWorkers, 503, "no_worker"),
    (InvalidRequest, 422, "invalid_request_error"),
    (AdmissionError, 422, "invalid_request_error"),
    (LlamasError, 400, "invalid_request_error"),
]
#: Without max_tokens a request may generate this many tokens.
DEFAULT_MAX_TOKENS = 256


def error_body(exc: LlamasError) -> tuple[int, dict[str, Any], dict[str, str]]:
    status, kind = next((s, k) for t, s, k in ERROR_STATUS if isinstance(exc, t))
    headers = {"X-Needed": str(exc.needed)} if isinstance(exc, InsufficientFee) else {}
    body = {"error": {"message": str(exc), "type": kind, "code": type(exc).__name__, **exc.as_dict()}}
    return status, body, headers


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class _Common(BaseModel):
    """Fields shared by both completion endpoints, plus the llamas extras."""

    model_config = ConfigDict(extra="ignore")
    model: str = "smollm2"
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # llamas extras: the bid, idempotency, deadline, constrained output.
    multiplier: float | None = None
    fee: int | None = None
    reference: str | None = None
    deadline_s: float | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def submission(self, headers: Any, **prompt: Any) -> Submission:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        schema = self.json_schema
        if schema is None and self.response_format and self.response_format.get("type") == "json_schema":
            schema = (self.response_format.get("json_schema") or {}).get("schema")
        multiplier = self.multiplier if self.multiplier is not None else headers.get("x-llamas-multiplier")
        fee = self.fee if self.fee is not None else headers.get("x-llamas-fee")
        try:
            fee = int(fee) if fee is not None else None
        except ValueError:
            raise InvalidRequest(f"fee must be an integer, got {fee!r}") from None
        return Submission(
            model=self.model, max_tokens=DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens, stop=stop,
            grammar=self.grammar, json_schema=schema, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, repeat_penalty=self.repeat_penalty, seed=self.seed,
            fee=fee, multiplier=multiplier, reference=self.reference, deadline_s=self.deadline_s, **prompt,
        )


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionRequest(_Common):
    prompt: str


def _usage(resp: dict[str, Any]) -> dict[str, Any]:
    p, c = resp.get("prompt_tokens") or 0, resp.get("completion_tokens") or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "offered": resp.get("offered"), "charged": resp.get("charged"), "refunded": resp.get("refunded")}


def create_app(service_factory: Callable[[], HerderService] | None = None) -> FastAPI:
    """Build the gateway around a ``HerderService`` (the process's own by default)."""
    app = FastAPI(title="llamas", version="1", docs_url="/docs")

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
        return JSONResponse({"error": {"message": detail, "type": "invalid_request_error", "code": "invalid"}},
                            status_code=422)

    def api_key(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise UnknownAccount("(no Bearer API key)")
        return key.strip()

    async def admit(request: Request, sub: Submission) -> dict[str, Any]:
        svc = service()
        key = api_key(request)
        if not dispatch.capacity(await run_in_threadpool(svc.herd)).get(sub.model):
            known = await run_in_threadpool(svc.counter.models)
            # An unknown model is a 404 even when nothing is running.
            exc: LlamasError = (UnknownModelRequested(sub.model, sorted(known)) if sub.model not in known
                                else NoWorkers(sub.model))
            svc.refused(exc)
            raise exc
        return await run_in_threadpool(svc.submit, key, sub)

    async def cancel_if_queued(key: str, job_id: str) -> None:
        try:
            await run_in_threadpool(service().cancel, key, job_id)
        except (JobNotQueued, UnknownJob):
            pass  # already running or finished: it completes and is charged as usual

    async def wait_response(request: Request, key: str, job_id: str) -> dict[str, Any] | None:
        """The final response, or None if the client went away (its queued job is cancelled)."""
        r = aredis()
        while True:
            raw = await r.get(RESPONSE_PREFIX + job_id)
            if raw:
                return json.loads(raw)
            if await request.is_disconnected():
                await cancel_if_queued(key, job_id)
                return None
            await r.blpop([NOTIFY_PREFIX + job_id], timeout=0.5)

    async def follow(job_id: str) -> AsyncIterator[dict[str, str]]:
        r, last = aredis(), "0-0"
        while True:
            batch = cast(list[Any], await r.xread({token_stream.key(job_id): last}, block=1000, count=100))
            for entry_id, raw in (batch[0][1] if batch else []):
                last = entry_id
                event = {k.decode(): v.decode() for k, v in raw.items()}
                yield event
                if event["event"] in ("end", "error"):
                    return
            if not batch:
                # Nothing new: the job may have ended without generating (expired, cancelled).
                if await r.exists(RESPONSE_PREFIX + job_id):
                    return

    async def completion(request: Request, body: _Common, sub: Submission, chat: bool) -> Any:
        key = api_key(request)
        doc = await admit(request, sub)
        job_id, created = doc["job_id"], int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}", "created": created, "model": body.model}

        def choice(text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            content = {"content": text} if text is not None else {}
            if delta:
                return {"index": 0, "delta": content, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text or ""}, "finish_reason": finish}

        if not body.stream:
            resp = await wait_response(request, key, job_id)
            if resp is None:
                return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
            if resp["status"] != "done":
                return _failed(resp)
            return {**base, "object": kind, "choices": [choice(resp["text"], resp["finish_reason"], False)],
                    "usage": _usage(resp)}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                if chat:
                    first = {**base, "object": chunk_kind,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                async for event in follow(job_id):
                    if event["event"] == "token":
                        yield f"data: {json.dumps({**base, 'object': chunk_kind, 'choices': [choice(event['text'], None, True)]})}\n\n"
                resp = await wait_response(request, key, job_id)
                finished = True
                if resp is None:
                    return
                if resp["status"] != "done":
                    err = {"error": {"message": resp.get("message"), "type": resp.get("error"), "code": resp["status"]}}
                    yield f"data: {json.dumps(err)}\n\n"
                else:
                    last = {**base, "object": chunk_kind, "choices": [choice(None, resp["finish_reason"], True)]}
                    if not include_usage:
                        last["usage"] = _usage(resp)
                    yield f"data: {json.dumps(last)}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps({**base, 'object': chunk_kind, 'choices': [], 'usage': _usage(resp)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    # The client went away mid-stream: refund it if the job had not started.
                    await cancel_if_queued(key, job_id)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Llamas-Job": job_id})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest) -> Any:
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await completion(request, body, body.submission(request.headers, messages=messages), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await completion(request, body, body.submission(request.headers, prompt=body.prompt), chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = await run_in_threadpool(service().info)
        return {"object": "list", "data": [
            {"id": m["name"], "object": "model", "created": 0, "owned_by": info["name"],
             "llamas_model_id": m["id"], "slots": m["slots"]} for m in info["models"]
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
    async def metrics() -> Response:
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


def _ping_ledger(svc: HerderService) -> None:
    with svc.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _failed(resp: dict[str, Any]) -> JSONResponse:
    status = {"expired": 408, "cancelled": 409}.get(resp["status"], 500)
    return JSONResponse({"error": {"message": resp.get("message"), "type": resp.get("error"),
                                   "code": resp["status"], "job_id": resp["job_id"]}}, status_code=status)


app = create_app()
