"""OpenAI's ``POST /v1/responses``, stateless: a chat completion asked and answered in the Responses shapes.

The body becomes a chat body (``responses_request``), checked by the chat
endpoint's own code, admitted, held, queued, generated and charged as any
chat completion (``completions.start``); the answer, plain or as the API's
typed SSE events, is shaped by ``responses_shapes``. Nothing is stored
beyond the job every request leaves: ``store: true`` and
``previous_response_id`` are refused by name.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request

from router.core.request import Submission
from router.gateway import completions, limits, openai_request, responses_request
from router.gateway.deps import AccountKey, AsyncRedis, Service, service_of
from router.gateway.responses_shapes import ResponseShapes
from router.gateway.waiting import AdmittedJob

router = APIRouter()


@dataclass(frozen=True)
class ResponsesCall:
    """One parsed Responses request: the chat submission it asks for, and what its answer echoes."""

    sub: Submission
    stream: bool
    #: Whether the chat body carries tools: then the output arrives in whole items at the end.
    tools: bool
    echo: dict[str, Any]


def echo(body: dict[str, Any], chat: dict[str, Any], sub: Submission) -> dict[str, Any]:
    """What every response object repeats of its request (the values used, defaults included)."""
    text = body.get("text") or {}
    return {"model": sub.model, "instructions": body.get("instructions"),
            "max_output_tokens": sub.max_tokens, "temperature": sub.temperature, "top_p": sub.top_p,
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "text": {"format": text.get("format") or {"type": "text"}}, "metadata": body.get("metadata") or {},
            "user": body.get("user"), "store": False, "truncation": "disabled", "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}}


async def responses_call(request: Request) -> ResponsesCall:
    body = openai_request.parse_body(limits.parse_json(await request.body(), service_of(request.app).settings))
    chat = responses_request.chat_body(body)
    sub = openai_request.submission(chat, request.headers, chat=True)
    return ResponsesCall(sub, bool(chat.get("stream")), bool(chat.get("tools")), echo(body, chat, sub))


async def events(job: AdmittedJob, shapes: ResponseShapes, live_text: bool) -> AsyncIterator[str]:
    """The typed SSE events of a streamed response, ``response.completed`` (or its failure) last.

    With ``live_text`` the message's text streams as it is made; otherwise
    (tools: the model's text may be a call) every item arrives whole at the end.
    """
    finished = False
    try:
        for line in shapes.opening():
            yield line
        async for event in job.follow():
            if event["event"] == "disconnected":
                return
            if not live_text or event["event"] not in ("token", "restart") or event["index"] != 0:
                continue
            if event["event"] == "token" and event["text"]:
                if not shapes.sent:
                    for line in shapes.text_opened():
                        yield line
                yield shapes.text_delta(event["text"])
            elif event["event"] == "restart" and shapes.sent:
                yield shapes.restart(int(event["attempt"] or 0))
        resp = await job.wait_response()
        finished = True
        if resp is None:
            return
        for line in (shapes.closing(resp) if resp["status"] == "done" else [shapes.failed(resp)]):
            yield line
    finally:
        if not finished:
            # The client went away before the end: refund it if the job had not started.
            with anyio.CancelScope(shield=True):
                await job.cancel_on_disconnect()


@router.post("/v1/responses", openapi_extra=responses_request.openapi_body())
async def responses(request: Request, key: AccountKey, call: Annotated[ResponsesCall, Depends(responses_call)],
                    svc: Service, r: AsyncRedis) -> Any:
    started = await completions.start(request, call.sub, call.stream, key, svc, r)
    shapes = ResponseShapes(started.job.job_id, int(time.time()), call.echo)
    if call.stream:
        return completions.event_stream(started, events(started.job, shapes, live_text=not call.tools))
    return await completions.answer(started, shapes.final)
