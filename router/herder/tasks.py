"""The herder's Celery tasks: thin wrappers over ``HerderService``.

Requests (submit, info, quote, status, receipt, cancel, raise_bid) are answered
through the result backend; refusals raise the typed errors of
``router.core.errors``, which the client gets back as the same types.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from celery import Task
from celery.signals import worker_ready, worker_shutdown

from llama_tasks import redact
from llama_tasks.errors import LlamasError
from router.core import webhooks
from router.core.errors import BadChannel, SecretUnreadable
from router.core.request import Submission
from router.core.service import HerderService, get_service
from router.core.settings import get_settings
from router.herder import broker_users, wiring
from router.herder.app import app
from router.herder.result_reader import ResultReader

log = logging.getLogger(__name__)

# Requests, envelopes and results carry prompts and completions: Celery's own
# log lines and events in this process must show neither.
redact.install_log_filter()


def service() -> HerderService:
    """This process's herder, wired on first use (after the fork, in a pool child)."""
    return get_service(lambda: wiring.build(get_settings(), app))


_reader: ResultReader | None = None


@worker_ready.connect
def _start_reader(sender: Any = None, **_: Any) -> None:
    """Read the results stream in the herder's main process, beside its pool."""
    global _reader
    # Signals are process-global: only a worker started for this app is a herder.
    if getattr(sender, "app", None) is not app:
        return
    _reader = ResultReader(service, redis.Redis.from_url(get_settings().redis_url),
                           consumer=f"{sender.hostname}:{os.getpid()}").start()
    # Bindings and broker users at once, not a minute later: a Redis that
    # restarted empty leaves operators' workers and clients locked out until then.
    sync_broker_users.delay()


@worker_shutdown.connect
def _stop_reader(sender: Any = None, **_: Any) -> None:
    if _reader is not None:
        _reader.stop()


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


@app.task(name="router.receipt", **_REQUEST)
def receipt(api_key: str, job_id: str) -> dict[str, Any]:
    return service().receipt(api_key, job_id)


@app.task(name="router.jobs", **_REQUEST)
def jobs(api_key: str, limit: int = 20) -> list[dict[str, Any]]:
    return service().jobs(api_key, limit)


@app.task(name="router.cancel", **_REQUEST)
def cancel(api_key: str, job_id: str) -> dict[str, Any]:
    return service().cancel(api_key, job_id)


@app.task(name="router.raise_bid", **_REQUEST)
def raise_bid(api_key: str, job_id: str, fee: int | None = None, multiplier: float | None = None) -> dict[str, Any]:
    return service().raise_bid(api_key, job_id, fee, multiplier)


# Nobody reads what the herder's own callbacks return: storing it would be
# one more write to the result store per request.
@app.task(name="router.settle", acks_late=True, ignore_result=True, **_PRIVATE)
def settle(*claimed: Any) -> None:
    """Link callbacks that an earlier herder attached to generations still in
    flight when it was upgraded. Results now travel on the results stream
    (``router.herder.result_reader``); what such a message claims is never trusted — the
    tick settles its attempt from the result store.
    """
    log.info("settle: a link callback from an earlier herder; the tick settles its attempt from the result store")


@app.task(name="router.settle_error", acks_late=True, ignore_result=True, **_PRIVATE)
def settle_error(task_id: Any) -> None:
    """Error callback of a generation (Celery passes the failed task's id; the
    failure is stored before error callbacks run)."""
    if not isinstance(task_id, str):
        return
    stored = service().transport.stored_results([task_id]).get(task_id)
    if stored is None or stored.state != "failed":
        log.warning("settle_error: task %s has no stored failure; ignored", task_id)
        return
    service().on_failure(task_id, stored.error)


# Housekeeping, many times a minute: without events it stays out of Flower,
# whose task list is for requests (the beat sends no task-sent event either:
# router.herder.app).
@app.task(name="router.tick", ignore_result=True, send_events=False, **_PRIVATE)
def tick() -> dict[str, int]:
    return service().tick()


#: Beyond its own deadline, how long a webhook try may run before Celery stops
#: it: only a resolver that never answers gets that far.
WEBHOOK_LIMIT_GRACE_S = 30


# The try's own deadline (``LLAMAS_WEBHOOK_TIMEOUT_S``, connect to last byte)
# ends it; the time limits are a backstop far below Celery's default, so no
# receiver can hold a herder process past them.
@app.task(name="router.webhook", bind=True, acks_late=True, max_retries=None,
          soft_time_limit=get_settings().webhook_timeout_s + WEBHOOK_LIMIT_GRACE_S,
          time_limit=get_settings().webhook_timeout_s + 2 * WEBHOOK_LIMIT_GRACE_S, **_PRIVATE)
def deliver_webhook(self: Task, job_id: str) -> int:
    """POST a job's signed response to its webhook, retrying with back-off.

    Each try ends by its deadline; a failed one is sent again later (a
    countdown, ``HerderSettings.webhook_pause_s``), so no herder process
    waits between tries. Returns the HTTP status, or 0 when nothing answered
    or the target was refused.
    """
    svc = service()
    try:
        url, secret, response = svc.webhook_target(job_id)
    except SecretUnreadable as exc:
        # Final: another try would meet the same key.
        log.error("webhook for job %s not delivered: %s", job_id, exc)
        return 0
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
    pause_s = svc.settings.webhook_pause_s(self.request.retries)
    log.warning("webhook for job %s to %s failed (%s); trying again in %gs", job_id, host, detail, pause_s)
    raise self.retry(countdown=pause_s)


#: The task that declares bindings and re-applies broker users (at start, then every minute).
SYNC_BROKER_USERS_TASK = "router.broker_users"


@app.task(name=SYNC_BROKER_USERS_TASK, ignore_result=True, send_events=False, **_PRIVATE)
def sync_broker_users() -> int:
    svc = service()
    return broker_users.sync(svc.settings, app, svc.sessions, svc.redis)


# Every minute: erase the text of jobs whose delivery and retention are over.
@app.task(name="router.erase_text", ignore_result=True, send_events=False, **_PRIVATE)
def erase_text() -> int:
    return service().erase_text(app.backend.get_key_for_task)
