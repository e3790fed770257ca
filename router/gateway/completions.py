"""OpenAI's ``/v1/chat/completions`` and ``/v1/completions`` (plain and SSE streaming), and ``/v1/models``."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from llama_tasks import tool_calls
from router.core import limits as fair_shares
from router.core.ledger import hash_api_key
from router.core.request import Submission
from router.core.service import HerderService
from router.gateway import limits, openai_request, openai_shapes, streams
from router.gateway.deps import AccountKey, AsyncRedis, Service, service_of
from router.gateway.errors import openai_error
from router.gateway.waiting import AdmittedJob

router = APIRouter()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """One parsed completions request: what to submit and how to answer."""

    sub: Submission
    stream: bool
    include_usage: bool
    chat: bool


async def _parse(request: Request, chat: bool) -> Call:
    body = openai_request.parse_body(limits.parse_json(await request.body(), service_of(request.app).settings))
    sub = openai_request.submission(body, request.headers, chat=chat)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return Call(sub, bool(body.get("stream")), include_usage, chat)


async def chat_call(request: Request) -> Call:
    return await _parse(request, chat=True)


async def text_call(request: Request) -> Call:
    return await _parse(request, chat=False)


async def admit(svc: HerderService, key: str, sub: Submission) -> tuple[dict[str, Any], fair_shares.Usage | None]:
    """Submit ``sub`` for ``key`` through the service's one admission path
    (the same checks, in the same order, as the client's and the CLI's); with
    the key's minute windows as that admission left them, when it counted one."""
    return await run_in_threadpool(svc.submit_counted, key, sub)


async def rate_limit_headers(svc: HerderService, key: str) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the key's account, as its minute windows stand after admission."""
    try:
        return fair_shares.headers(await run_in_threadpool(svc.rate_limits, key))
    except Exception as exc:  # advisory: an admitted job is answered without them, never with a 500
        log.warning("rate-limit headers left out: %s", type(exc).__name__)
        return {}


@dataclass(frozen=True)
class Started:
    """An admitted job as its HTTP request holds it: the job, its rate-limit headers, its stream's slot."""

    job: AdmittedJob
    headers: dict[str, str]
    slot: streams.Slot | None


async def start(request: Request, sub: Submission, stream: bool, key: str, svc: HerderService,
                r: aioredis.Redis) -> Started:
    """Admit ``sub`` for ``key``: the one path of every endpoint that generates (chat, text, Responses)."""
    # A stream's slot is claimed before admission: past the key's share, nothing is held.
    slot = await streams.claim(request.app, hash_api_key(key)) if stream else None
    try:
        doc, usage = await admit(svc, key, sub)
    except BaseException:
        if slot is not None:
            await slot.release()
        raise
    # A new job's windows are known from its admission; a reference sent again reads them.
    headers = fair_shares.headers(usage) if usage is not None else await rate_limit_headers(svc, key)
    return Started(AdmittedJob(request, svc, r, key, doc["job_id"]), headers, slot)


async def answer(started: Started, shape: Callable[[dict[str, Any]], dict[str, Any]]) -> JSONResponse:
    """Wait for the job and answer it: ``shape`` of a done response, or the error a failed one gets."""
    resp = await started.job.wait_response()
    if resp is None:
        return openai_error(499, "client disconnected", "invalid_request_error", "client_closed")
    if resp["status"] != "done":
        status, body, retry = openai_shapes.failed(resp)
        return JSONResponse(body, status_code=status, headers={**started.headers, **retry})
    return JSONResponse(shape(resp), headers=started.headers)


def event_stream(started: Started, lines: AsyncIterator[str]) -> streams.HeldStream:
    """The SSE response that sends ``lines``, holding the stream's slot until it ends."""
    assert started.slot is not None
    return streams.HeldStream(lines, started.slot, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Llamas-Job": started.job.job_id,
                                       **started.headers})


async def completion(request: Request, call: Call, key: str, svc: HerderService,
                     r: aioredis.Redis) -> Any:
    """Admit ``call`` and answer it: the whole completion, or its SSE stream."""
    started = await start(request, call.sub, call.stream, key, svc, r)
    shapes = openai_shapes.Shapes(started.job.job_id, call.sub.model, call.chat, int(time.time()),
                                  len(call.sub.prompt or ""))
    if call.stream:
        # A chat that offered tools streams each choice's text through its own tool-call parser.
        generation = call.sub.generation()
        parsers = [tool_calls.parser_for(generation, started.job.job_id, i) if call.chat else None
                   for i in range(call.sub.n)]
        return event_stream(started, events(started.job, shapes, parsers, call.include_usage))
    return await answer(started, lambda resp: shapes.final(resp["choices"], openai_shapes.usage(resp)))


def final_choices(resp: dict[str, Any]) -> list[dict[str, Any]]:
    """A done response's choices (a result that listed none answers one, with the job's finish reason)."""
    return resp.get("choices") or [{"index": 0, "text": resp.get("text") or "",
                                    "finish_reason": resp.get("finish_reason")}]


async def events(job: AdmittedJob, shapes: openai_shapes.Shapes,
                 parsers: list[tool_calls.ToolCallParser | None], include_usage: bool) -> AsyncIterator[str]:
    """The SSE lines of a streamed completion: every choice's pieces as made, then each one's end; ``[DONE]`` last.

    ``parsers`` holds one entry per choice; a choice with a parser (a chat
    that offered tools) streams its content as it is known and each call
    once it is whole and valid.
    """
    finished = False
    try:
        if shapes.chat:
            for index in range(len(parsers)):
                yield shapes.sse(shapes.role_chunk(index))
        async for event in job.follow():
            if event["event"] == "token":
                index = event["index"]
                parser = parsers[index]
                if parser is None:
                    yield shapes.sse(shapes.text_chunk(event["text"], index, event["logprobs"]))
                else:
                    for chunk in shapes.tool_chunks(parser.feed(event["text"]), index):
                        yield shapes.sse(chunk)
            elif event["event"] == "restart":
                index = event["index"]
                parser = parsers[index]
                if parser is not None:  # the choice's text so far is void, and so is what was parsed of it
                    parsers[index] = parser.fresh()
                yield shapes.sse(shapes.restart_chunk(int(event["attempt"] or 0), index))
            elif event["event"] == "disconnected":
                return
        resp = await job.wait_response()
        finished = True
        if resp is None:
            return
        if resp["status"] == "done":
            for index, parser in enumerate(parsers):
                for chunk in shapes.tool_chunks(parser.close() if parser is not None else [], index):
                    yield shapes.sse(chunk)
        if resp["status"] != "done":
            yield shapes.sse(openai_shapes.failed_chunk(resp))
        else:
            for chunk in shapes.closing_chunks(final_choices(resp), openai_shapes.usage(resp), include_usage):
                yield shapes.sse(chunk)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            # The client went away before the end: refund it if the job had not started.
            # Shielded, because this cleanup runs inside the scope that was just cancelled.
            with anyio.CancelScope(shield=True):
                await job.cancel_on_disconnect()


# FastAPI resolves a route's dependencies in the order of its parameters, and
# that is the order of the checks: the key (401, before a byte of the body is
# read), then the body (400/413/422).

@router.post("/v1/chat/completions", openapi_extra=openai_request.openapi_body(chat=True))
async def chat_completions(request: Request, key: AccountKey, call: Annotated[Call, Depends(chat_call)],
                           svc: Service, r: AsyncRedis) -> Any:
    return await completion(request, call, key, svc, r)


@router.post("/v1/completions", openapi_extra=openai_request.openapi_body(chat=False))
async def completions(request: Request, key: AccountKey, call: Annotated[Call, Depends(text_call)],
                      svc: Service, r: AsyncRedis) -> Any:
    return await completion(request, call, key, svc, r)


@router.get("/v1/models")
async def models(svc: Service) -> dict[str, Any]:
    return openai_shapes.model_list(await run_in_threadpool(svc.info))
