"""The herder's Celery tasks: thin wrappers over ``HerderService``.

Requests (submit, info, quote, status, cancel, raise_bid) are answered
through the result backend; refusals raise the typed errors of
``router.errors``, which the client gets back as the same types.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from llama_tasks import redact
from llama_tasks.errors import LlamasError
from llama_tasks.settings import queue_for
from llama_tasks.constants import GENERATE_TASK as GENERATE
from router import webhooks
from router.admission import Submission
from router.app import app
from router.errors import BadChannel
from router.models import JobRow
from router.service import HerderService, get_service
from router.settings import HERDER_QUEUE, HerderSettings

log = logging.getLogger(__name__)

#: How long ``settle`` waits for the worker's result to reach the backend:
#: Celery sends link callbacks just before it stores the result.
RESULT_WAIT_S, RESULT_POLL_S = 2.0, 0.002

# Requests, envelopes and results carry prompts and completions: Celery's own
# log lines and events in this process must show neither.
redact.install_log_filter()


def _send_generation(row: JobRow, envelope: dict[str, Any]) -> None:
    app.send_task(
        GENERATE,
        args=[envelope],
        # What task events (Flower) show of the message: ids and sizes.
        argsrepr=redact.describe({"envelope": envelope}),
        kwargsrepr="{}",
        queue=queue_for(row.model),
        task_id=row.task_id,
        # Immutable: the callback gets only the task id (settle reads the
        # stored result), so the completion is not copied into one more
        # message and its events.
        link=app.signature("router.settle", args=(row.task_id,), immutable=True, queue=HERDER_QUEUE),
        link_error=app.signature("router.settle_error", queue=HERDER_QUEUE),
    )


def _send_callback(task: str, queue: str, response: dict[str, Any]) -> None:
    app.send_task(task, args=[response], queue=queue,
                  argsrepr=redact.describe({"response": response}), kwargsrepr="{}")


def _send_webhook(job_id: str) -> None:
    deliver_webhook.apply_async(args=[job_id], queue=HERDER_QUEUE)


def _build(settings: HerderSettings) -> HerderService:
    return HerderService(settings, _send_generation, _send_callback, _send_webhook)


def service() -> HerderService:
    return get_service(_build)


# Expected refusals are returned to the requester, not logged as crashes.
# Requests and answers hold API keys, prompts and completions: the private
# Request keeps them out of events and remote control.
_PRIVATE: dict[str, Any] = dict(Request=redact.PRIVATE_REQUEST)
_REQUEST: dict[str, Any] = dict(bind=False, throws=(LlamasError,), acks_late=False, **_PRIVATE)


@app.task(name="router.submit", **_REQUEST)
def submit(api_key: str, request: dict[str, Any]) -> dict[str, Any]:
    return service().submit(api_key, Submission.from_dict(request))


@app.task(name="router.quote", **_REQUEST)
def quote(request: dict[str, Any]) -> dict[str, Any]:
    return service().quote(Submission.from_dict(request))


@app.task(name="router.info", **_REQUEST)
def info() -> dict[str, Any]:
    return service().info()


@app.task(name="router.status", **_REQUEST)
def status(api_key: str, job_id: str) -> dict[str, Any]:
    return service().status(api_key, job_id)


@app.task(name="router.jobs", **_REQUEST)
def jobs(api_key: str, limit: int = 20) -> list[dict[str, Any]]:
    return service().jobs(api_key, limit)


@app.task(name="router.cancel", **_REQUEST)
def cancel(api_key: str, job_id: str) -> dict[str, Any]:
    return service().cancel(api_key, job_id)


@app.task(name="router.raise_bid", **_REQUEST)
def raise_bid(api_key: str, job_id: str, fee: int | None = None, multiplier: float | None = None) -> dict[str, Any]:
    return service().raise_bid(api_key, job_id, fee, multiplier)


def _backend_meta(task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + RESULT_WAIT_S
    while True:
        meta = app.backend.get_task_meta(task_id, cache=False)
        if meta.get("status") in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
            return meta
        time.sleep(RESULT_POLL_S)


@app.task(name="router.settle", acks_late=True, **_PRIVATE)
def settle(claimed: Any) -> None:
    """Link callback of a generation: settle from the *stored* result, not the message.

    ``claimed`` is the generation's task id (messages sent before the link
    became immutable carry the worker's whole result; only its id is used).
    """
    task_id = claimed.get("task_id") if isinstance(claimed, dict) else claimed
    if not isinstance(task_id, str):
        log.warning("settle: message without a task id ignored")
        return
    meta = _backend_meta(task_id)
    if meta.get("status") != "SUCCESS" or not isinstance(meta.get("result"), dict):
        log.warning("settle: no stored result for task %s (status %s); ignored", task_id, meta.get("status"))
        return
    service().on_result(task_id, meta["result"])


@app.task(name="router.settle_error", acks_late=True, **_PRIVATE)
def settle_error(task_id: Any) -> None:
    """Error callback of a generation (Celery passes the failed task's id)."""
    if not isinstance(task_id, str):
        return
    meta = _backend_meta(task_id)
    if meta.get("status") != "FAILURE":
        log.warning("settle_error: task %s is %s, not failed; ignored", task_id, meta.get("status"))
        return
    result = meta.get("result")
    service().on_failure(task_id, result if isinstance(result, BaseException) else None)


@app.task(name="router.tick", ignore_result=True, **_PRIVATE)
def tick() -> dict[str, int]:
    return service().tick()


@app.task(name="router.webhook", bind=True, acks_late=True, max_retries=None, **_PRIVATE)
def deliver_webhook(self: Task, job_id: str) -> int:
    """POST a job's signed response to its webhook, retrying with back-off.

    Returns the HTTP status, or 0 when nothing answered or the target was refused.
    """
    svc = service()
    url, secret, response = svc.webhook_target(job_id)
    try:
        code = webhooks.post(url, secret, job_id, response, svc.settings.webhook_timeout_s,
                             svc.settings.webhook_allowed)
    except BadChannel as exc:
        # Final (``WebhookTargetRefused``, mostly): retrying would only ask the
        # same resolver again, and an internal address must never get the POST.
        log.error("webhook for job %s refused, not delivered: %s", job_id, exc)
        return 0
    except OSError as exc:
        code, detail = 0, f"{type(exc).__name__}: {exc}"
    else:
        detail = f"HTTP {code}"
    if 200 <= code < 300:
        return code
    # The host only: a URL's path and query may hold the requester's tokens.
    host = webhooks.parse_target(url).host
    if self.request.retries + 1 >= svc.settings.webhook_attempts:
        log.error("webhook for job %s to %s failed for good: %s", job_id, host, detail)
        return code
    log.warning("webhook for job %s to %s failed (%s); retrying", job_id, host, detail)
    raise self.retry(countdown=min(60, 2 ** self.request.retries))
