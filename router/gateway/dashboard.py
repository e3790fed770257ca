"""The live dashboard: ``/dashboard``, its sign-in and its stream of snapshots (server-sent events).

Who signs in decides what they see: the admin key (``LLAMAS_ADMIN_KEY``)
opens the whole marketplace, a requester's API key their own account only.
The key travels once, in the sign-in's body; the ``HttpOnly``,
``SameSite=Strict`` cookie scoped to ``/dashboard`` then holds a random
session id, never the key (``sessions``). Every snapshot checks the session
again, so signing out, its expiry or a rotated key ends it at once. Each
open stream holds one of its key's ``LLAMAS_MAX_STREAMS_PER_KEY`` slots.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from llama_tasks.errors import InvalidRequest
from router.core import operators, placement_store
from router.core.errors import UnknownAccount
from router.core.service import HerderService
from router.gateway import limits, sessions, streams
from router.gateway import snapshot as dashboard
from router.gateway.deps import Service
from router.gateway.docs import STATIC_DIR

#: The cookie that carries the session id.
COOKIE = "llamas_dashboard"
PATH = "/dashboard"

router = APIRouter(prefix=PATH, include_in_schema=False)


class SignIn(BaseModel):
    key: str = Field(min_length=1, max_length=500, description="The admin key or a requester's API key.")


@dataclass
class _Parts:
    """This app's memory of the herd, cached ledger verdict and latest admin snapshot (one
    per app: tests build several)."""

    memory: dashboard.HerdMemory
    books: dashboard.BooksCache = field(default_factory=dashboard.BooksCache)
    #: The admin's view is the same for every admin tab: built once a period, not once a tab.
    admin_doc: dict[str, Any] | None = None
    admin_at: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parts(app: FastAPI, svc: HerderService) -> _Parts:
    parts = getattr(app.state, "dashboard_parts", None)
    if parts is None:
        parts = app.state.dashboard_parts = _Parts(dashboard.HerdMemory(svc.redis))
    return parts


def snapshot(app: FastAPI, svc: HerderService, who: str) -> dict[str, Any]:
    """What the session of ``who`` may see now (who it is checked every time, the admin's view shared)."""
    parts = _parts(app, svc)
    herd = svc.herd()
    with svc.read_sessions.begin() as session:
        account = sessions.account_of(session, svc, who)
        if account is not None:
            return dashboard.requester_view(session, svc.settings, herd, account)
        with parts.lock:
            now = time.time()
            if parts.admin_doc is None or now - parts.admin_at >= dashboard.DEFAULT_PERIOD_S:
                keys = operators.public_keys(session)
                workers = parts.memory.observe([dashboard.attributed(w, keys, now) for w in herd], now)
                decisions = placement_store.decisions(svc.redis, dashboard.PLACEMENT_DECISIONS)
                parts.admin_doc = dashboard.admin_view(session, svc.settings, herd, workers, parts.books, now,
                                                       decisions, placement_store.waiting(svc.redis))
                parts.admin_at = now
            return parts.admin_doc


@router.get("")
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard" / "index.html", headers={"Cache-Control": "no-store"})


async def _sign_in_body(request: Request, svc: HerderService) -> SignIn:
    # Parsed as every body is (its shape and numbers checked first), not by FastAPI's own json.loads.
    body = limits.parse_json(await request.body(), svc.settings)
    try:
        return SignIn.model_validate(body)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(detail) from None


@router.post("/session")
async def sign_in(request: Request, svc: Service) -> JSONResponse:
    body = await _sign_in_body(request, svc)

    ttl_s = svc.settings.dashboard_session_s

    def check() -> tuple[str, dict[str, Any]]:
        with svc.read_sessions.begin() as session:
            who, account = sessions.identify(session, svc, body.key)
        doc = {"role": "admin"} if account is None else {"role": "requester", "account": account.name}
        return sessions.open_session(svc.redis, who, ttl_s), doc

    session_id, doc = await run_in_threadpool(check)
    reply = JSONResponse(doc)
    reply.set_cookie(COOKIE, session_id, max_age=ttl_s, path=PATH,
                     httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return reply


@router.delete("/session")
async def sign_out(request: Request, svc: Service) -> Response:
    await run_in_threadpool(sessions.close_session, svc.redis, request.cookies.get(COOKIE))
    reply = Response(status_code=204)
    reply.delete_cookie(COOKIE, path=PATH)
    return reply


@router.get("/snapshot")
async def one_snapshot(request: Request, svc: Service) -> dict[str, Any]:
    who = await run_in_threadpool(sessions.who_is, svc.redis, request.cookies.get(COOKIE))
    return await run_in_threadpool(snapshot, request.app, svc, who)


@router.get("/events")
async def events(request: Request, svc: Service) -> streams.HeldStream:
    """A snapshot every ``DEFAULT_PERIOD_S`` as server-sent events, until the page goes away or the session ends."""
    session_id = request.cookies.get(COOKIE)
    who = await run_in_threadpool(sessions.who_is, svc.redis, session_id)
    slot = await streams.claim(request.app, sessions.stream_owner(who))  # 429 past the key's share
    try:
        first = await run_in_threadpool(snapshot, request.app, svc, who)  # a bad session is a 401 here
    except BaseException:
        await slot.release()
        raise

    async def stream() -> AsyncIterator[str]:
        doc: dict[str, Any] | None = first
        while doc is not None:
            yield f"data: {json.dumps(doc)}\n\n"
            await asyncio.sleep(dashboard.DEFAULT_PERIOD_S)
            if await request.is_disconnected():
                return
            try:
                who = await run_in_threadpool(sessions.who_is, svc.redis, session_id)
                doc = await run_in_threadpool(snapshot, request.app, svc, who)
            except UnknownAccount:
                yield "event: signed-out\ndata: {}\n\n"
                doc = None

    return streams.HeldStream(stream(), slot, media_type="text/event-stream",
                              headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
