"""The real transport and forwarder: Celery messages through Redis.

Generation tasks go to the model's queue; workers publish results on the
results stream that the herders read (``router.herder.result_reader``), and failures come
back through a linked error callback. The result backend is what the
herder's tick reads to settle an attempt whose result never reached it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery

from llama_tasks import redact
from llama_tasks.constants import GENERATE_TASK
from llama_tasks.settings import queue_for
from router.core import forwarding
from router.core.models import JobRow
from router.core.parts import StoredResult
from router.core.settings import HERDER_QUEUE

SETTLE_ERROR_TASK, WEBHOOK_TASK = "router.settle_error", "router.webhook"


class CeleryTransport:
    """Sends envelopes as ``llama_tasks.generate`` tasks and reads their stored results."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        self.app.send_task(
            GENERATE_TASK,
            args=[envelope],
            # What task events (Flower) show of the message: ids and sizes.
            argsrepr=redact.describe({"envelope": envelope}),
            kwargsrepr="{}",
            queue=queue_for(row.model),
            task_id=row.task_id,
            # A result comes back on the results stream (``router.herder.result_reader``),
            # published by the worker; a failure through this error callback,
            # which Celery sends after it stores the failure.
            link_error=self.app.signature(SETTLE_ERROR_TASK, queue=HERDER_QUEUE),
        )

    def stored_results(self, task_ids: Iterable[str]) -> dict[str, StoredResult]:
        ids = list(task_ids)
        if not ids:
            return {}
        backend: Any = self.app.backend
        found: dict[str, StoredResult] = {}
        for task_id, raw in zip(ids, backend.mget([backend.get_key_for_task(t) for t in ids])):
            if raw is None:
                continue
            meta = backend.decode_result(raw)
            result = meta.get("result")
            if meta.get("status") == "SUCCESS" and isinstance(result, dict):
                found[task_id] = StoredResult("done", document=result)
            elif meta.get("status") == "FAILURE":
                found[task_id] = StoredResult("failed", error=result if isinstance(result, BaseException) else None)
        return found


class CeleryForwarder:
    """Responses to waiting handles through Redis, callbacks and webhooks as Celery tasks."""

    def __init__(self, app: Celery, r: redis.Redis, response_ttl_s: int) -> None:
        self.app = app
        self.redis = r
        self.response_ttl_s = response_ttl_s

    def to_handle(self, response: dict[str, Any], times: tuple[float, float | None, float | None]) -> None:
        # The outcome's metrics are counted by the service, once per job, when it records the delivery.
        forwarding.to_handle(self.redis, response, self.response_ttl_s)

    def to_callback(self, task: str, queue: str, response: dict[str, Any]) -> None:
        self.app.send_task(task, args=[response], queue=queue,
                           argsrepr=redact.describe({"response": response}), kwargsrepr="{}")

    def to_webhook(self, job_id: str) -> None:
        self.app.send_task(WEBHOOK_TASK, args=[job_id], queue=HERDER_QUEUE)
