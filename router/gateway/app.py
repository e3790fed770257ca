"""The gateway's FastAPI app, assembled from its routers around a service factory."""

from __future__ import annotations

from fastapi import FastAPI

from router.gateway import completions, dashboard, deps, docs, embeddings, errors, headers, jobs, limits, ops, responses
from router.gateway.deps import ServiceFactory


def create_app(service_factory: ServiceFactory) -> FastAPI:
    """Build the gateway around the ``HerderService`` that ``service_factory`` gives."""
    # /docs is served from the package's own assets (FastAPI's loads them from a
    # CDN); /redoc, CDN-only too, is not offered.
    app = FastAPI(title="llamas", version="1", docs_url=None, redoc_url=None)
    # Outermost last: security headers on every answer, a 500 for what escapes the rest,
    # then the body's length checked before any route (or FastAPI) reads a byte of it.
    app.add_middleware(limits.BodyLimit)
    app.add_middleware(errors.LastResort)
    app.add_middleware(headers.SecurityHeaders)
    deps.install(app, service_factory)
    errors.install(app)
    app.include_router(completions.router)
    app.include_router(responses.router)
    app.include_router(embeddings.router)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.include_router(dashboard.router)
    docs.install(app)
    return app
