"""The admin's routes: ``/health`` (is the gateway able to serve?) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router.core.service import HerderService
from router.gateway.deps import Service, is_admin_key, redis_of
from router.gateway.errors import openai_error
from router.gateway.prometheus import ServiceCollector

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request, svc: Service) -> Response:
    if svc.settings.admin_key:
        # Revenue and refusals are business data: only the admin key may read them.
        given = request.headers.get("authorization", "").partition(" ")[2].strip()
        if not is_admin_key(svc, given):
            return openai_error(401, "/metrics needs the admin key (LLAMAS_ADMIN_KEY) as a Bearer token",
                                "invalid_api_key", "UnknownAccount")
    body = await run_in_threadpool(generate_latest, _registry(request.app, svc))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _registry(app: FastAPI, svc: HerderService) -> CollectorRegistry:
    """``app``'s own registry (one per app: tests build several), its collector registered on the first scrape."""
    registry: CollectorRegistry | None = getattr(app.state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry()
        registry.register(ServiceCollector(svc))
        app.state.metrics_registry = registry
    return registry


@router.get("/health")
async def health(request: Request, svc: Service) -> JSONResponse:
    checks: dict[str, Any] = {
        "broker": await _broker(request.app),
        "ledger": await _ledger(svc),
        "herd": await _herd(svc),
    }
    healthy = all(checks[c]["state"] == "ok" for c in ("broker", "ledger"))
    status = "ok" if healthy and checks["herd"]["state"] == "ok" else ("degraded" if healthy else "down")
    return JSONResponse({"status": status, **checks}, status_code=200 if healthy else 503)


async def _broker(app: FastAPI) -> dict[str, Any]:
    try:
        # The client is made inside the check (not a dependency): failing to make one is "down" too.
        await redis_of(app).ping()
        return {"state": "ok"}
    except Exception as exc:  # any failure means "down"; the message says which
        return {"state": "down", "error": str(exc)}


async def _ledger(svc: HerderService) -> dict[str, Any]:
    try:
        await run_in_threadpool(svc.ping_ledger)
        return {"state": "ok"}
    except Exception as exc:
        return {"state": "down", "error": str(exc)}


async def _herd(svc: HerderService) -> dict[str, Any]:
    try:
        herd = await run_in_threadpool(svc.herd)
        slots = sum(int(w.get("slots", 0)) for w in herd)
        return {"state": "ok" if slots else "empty", "workers": len(herd), "slots": slots}
    except Exception as exc:
        return {"state": "down", "error": str(exc)}
