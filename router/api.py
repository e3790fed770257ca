"""The HTTP gateway: ``uvicorn router.api:app``.

OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` (plain and
SSE streaming) and ``/v1/models`` with Bearer API keys, plus ``/info``,
``/jobs/{id}``, ``/health``, ``/metrics`` (Prometheus), the live
``/dashboard`` and the API docs (``/docs``), both served from the package's
own assets. It runs inside the herder's trust domain and calls the same
admission code as the herder's tasks, directly.

The parts live in ``router.gateway``; this module assembles them.
"""

from __future__ import annotations

from fastapi import FastAPI

from router.gateway import completions, dashboard, deps, docs, errors, jobs, ops
from router.gateway.deps import ServiceFactory
from router.gateway.errors import error_body
from router.core.preflight import GatewayPreflight

# error_body is re-exported: callers outside the gateway (the chaos tests) import it from here.
__all__ = ["app", "create_app", "error_body"]


def create_app(service_factory: ServiceFactory | None = None) -> FastAPI:
    """Build the gateway around a ``HerderService`` (the process's own by default)."""
    # /docs is served from the package's own assets (FastAPI's loads them from a
    # CDN); /redoc, CDN-only too, is not offered.
    app = FastAPI(title="llamas", version="1", docs_url=None, redoc_url=None)
    app.add_middleware(errors.LastResort)
    deps.install(app, service_factory)
    errors.install(app)
    app.include_router(completions.router)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(dashboard.router)
    docs.install(app)
    return app


app = create_app()
# Only the process's own gateway checks its key and Redis at start-up (tests build theirs with create_app).
app.add_middleware(GatewayPreflight)
