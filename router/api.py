"""The HTTP gateway: ``uvicorn router.api:app``.

OpenAI-compatible ``/v1/chat/completions``, ``/v1/completions`` (plain and
SSE streaming) and ``/v1/models`` with Bearer API keys, plus ``/info``,
``/jobs/{id}``, ``/health``, ``/metrics`` (Prometheus), the live
``/dashboard`` and the API docs (``/docs``), both served from the package's
own assets. It runs inside the herder's trust domain and calls the same
admission code as the herder's tasks, directly.

The parts live in ``router.gateway``; this module wires them to the herder
process's own service, as the herder's tasks do.
"""

from __future__ import annotations

from router.core.preflight import GatewayPreflight
from router.core.service import HerderService
from router.gateway.app import create_app

__all__ = ["app"]


def _herder_service() -> HerderService:
    # Imported on first use: router.herder.tasks builds the herder's Celery app
    # (the gateway sends work through it) when the first request needs it.
    from router.herder.tasks import service

    return service()


app = create_app(_herder_service)
# Only the process's own gateway checks its key and Redis at start-up (tests build theirs with create_app).
app.add_middleware(GatewayPreflight)
