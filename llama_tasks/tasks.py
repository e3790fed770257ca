"""The one Celery task of the inference workers: a thin wrapper over ``runtime``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from llama_tasks import redact, runtime
from llama_tasks.celery import app
from llama_tasks.constants import GENERATE_TASK
from llama_tasks.errors import EngineFailed, InvalidRequest, Rejected

log = logging.getLogger(__name__)

GENERATE = GENERATE_TASK

# Envelopes carry prompts and results carry completions: Celery's own log
# lines and events must show neither.
redact.install_log_filter()


@app.task(
    name=GENERATE,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=0,
    # Expected refusals: logged as one line with their reason, not a traceback.
    # (``EngineFailed``: a job handed back when its worker changes models, or its engine stalled.)
    throws=(Rejected, InvalidRequest, EngineFailed),
    Request=redact.PRIVATE_REQUEST,
)
def generate(self: Task, envelope: Any) -> dict[str, Any]:
    """Generate one signed job; the result document is the task's return value."""
    try:
        doc = runtime.run_envelope(runtime.context(), envelope, self.request.id, self.request.hostname)
    except (Rejected, InvalidRequest, EngineFailed) as exc:
        # The type and its numbers only: messages may quote the request.
        log.warning("task %s refused: %s", self.request.id, redact.describe_error(exc))
        raise
    timings, first = doc["timings"], doc["choices"][0]
    log.info(
        "task %s: job %s attempt %d: %d prompt + %d completion tokens (%d chars), %s, %.2fs + %.2fs",
        self.request.id, doc["job_id"], doc["attempt"], doc["prompt_tokens"], doc["completion_tokens"],
        len(first["text"]), first["finish_reason"], timings["prompt_s"], timings["generation_s"],
    )
    return doc
