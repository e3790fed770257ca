"""The live dashboard: ``/dashboard``, its sign-in and its stream of snapshots (server-sent events).

Who signs in decides what they see: the admin key (``LLAMAS_ADMIN_KEY``)
opens the whole marketplace, a requester's API key their own account only.
The key travels once, in the sign-in's body, and is then kept in an
``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/dashboard``: page
scripts cannot read it, other sites cannot send it, and every snapshot
checks it again, so a rotated key ends its sessions at once.
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
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from router.core import ledger, operators
from router.core.errors import UnknownAccount
from router.core.models import Account
from router.core.service import HerderService
from router.gateway import snapshot as dashboard
from router.gateway.deps import Service, is_admin_key
from router.gateway.docs import STATIC_DIR

#: The cookie that carries the signed-in key.
COOKIE = "llamas_dashboard"
PATH = "/dashboard"

router = APIRouter(prefix=PATH, include_in_schema=False)


class SignIn(BaseModel):
    key: str = Field(min_length=1, max_length=500, description="The admin key or a requester's API key.")


def _identify(session: Session, svc: HerderService, key: str) -> Account | None:
    """None for the admin key, the account for a requester's; ``UnknownAccount`` otherwise."""
    if is_admin_key(svc, key):
        return None
    return ledger.account_by_key(session, key)


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


def snapshot(app: FastAPI, svc: HerderService, key: str) -> dict[str, Any]:
    """What ``key`` may see now (the key is checked every time, the admin's view shared)."""
    parts = _parts(app, svc)
    herd = svc.herd()
    with svc.read_sessions.begin() as session:
        account = _identify(session, svc, key)
        if account is not None:
            return dashboard.requester_view(session, svc.settings, herd, account)
        with parts.lock:
            now = time.time()
            if parts.admin_doc is None or now - parts.admin_at >= dashboard.DEFAULT_PERIOD_S:
                keys = operators.public_keys(session)
                workers = parts.memory.observe([dashboard.attributed(w, keys, now) for w in herd], now)
                parts.admin_doc = dashboard.admin_view(session, svc.settings, herd, workers, parts.books, now)
                parts.admin_at = now
            return parts.admin_doc


def _who(session_key: str | None) -> str:
    if not session_key:
        raise UnknownAccount("(not signed in to the dashboard)")
    return session_key


@router.get("")
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard" / "index.html", headers={"Cache-Control": "no-store"})


@router.post("/session")
async def sign_in(body: SignIn, request: Request, svc: Service) -> JSONResponse:
    def check() -> dict[str, Any]:
        with svc.read_sessions.begin() as session:
            account = _identify(session, svc, body.key)
            return {"role": "admin"} if account is None else {"role": "requester", "account": account.name}

    who = await run_in_threadpool(check)
    reply = JSONResponse(who)
    reply.set_cookie(COOKIE, body.key, path=PATH, httponly=True, samesite="strict",
                     secure=request.url.scheme == "https")
    return reply


@router.delete("/session")
async def sign_out() -> Response:
    reply = Response(status_code=204)
    reply.delete_cookie(COOKIE, path=PATH)
    return reply


@router.get("/snapshot")
async def one_snapshot(request: Request, svc: Service) -> dict[str, Any]:
    key = _who(request.cookies.get(COOKIE))
    return await run_in_threadpool(snapshot, request.app, svc, key)


@router.get("/events")
async def events(request: Request, svc: Service) -> StreamingResponse:
    """A snapshot every ``DEFAULT_PERIOD_S`` as server-sent events, until the page goes away."""
    key = _who(request.cookies.get(COOKIE))
    first = await run_in_threadpool(snapshot, request.app, svc, key)  # a bad key is a 401 here, not mid-stream

    async def stream() -> AsyncIterator[str]:
        doc: dict[str, Any] | None = first
        while doc is not None:
            yield f"data: {json.dumps(doc)}\n\n"
            await asyncio.sleep(dashboard.DEFAULT_PERIOD_S)
            if await request.is_disconnected():
                return
            try:
                doc = await run_in_threadpool(snapshot, request.app, svc, key)
            except UnknownAccount:
                yield "event: signed-out\ndata: {}\n\n"
                doc = None

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
