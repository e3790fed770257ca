"""The one Celery task of the inference workers: a thin wrapper over ``runtime``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from llama_tasks import runtime
from llama_tasks.app import app
from llama_tasks.constants import GENERATE_TASK
from llama_tasks.errors import InvalidRequest, Rejected

log = logging.getLogger(__name__)

GENERATE = GENERATE_TASK


@app.task(
    name=GENERATE,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=0,
    # Expected refusals: logged as one line with their reason, not a traceback.
    throws=(Rejected, InvalidRequest),
)
def generate(self: Task, envelope: Any) -> dict[str, Any]:
    """Generate one signed job; the result document is the task's return value."""
    try:
        return runtime.run_envelope(runtime.context(), envelope, self.request.id, self.request.hostname)
    except (Rejected, InvalidRequest) as exc:
        log.warning("task %s refused: %s: %s", self.request.id, type(exc).__name__, exc)
        raise
