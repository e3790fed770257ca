"""The Celery application of the inference workers and its lifecycle hooks.

Start a worker with ``celery -A llama_tasks worker -Q llama.<model>``. The
main process checks the model and key before it forks (refusing to start
otherwise) and publishes heartbeats; each prefork child loads the model once
in ``worker_process_init``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import redis
from billiard.process import current_process
from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from celery.worker.state import active_requests

from llama_tasks import lifeline, runtime
from llama_tasks.errors import LlamasError
from llama_tasks.heartbeat import Heartbeat
from llama_tasks.registry import ModelSpec
from llama_tasks.settings import get_settings

log = logging.getLogger(__name__)

app = Celery("llama_tasks")
app.config_from_object("celeryconfig")
app.conf.task_default_queue = get_settings().queue
# An embedded beat (-B) dies with this worker's main process, as the pool children do.
lifeline.connect_celery_signals()

# Signals are process-global, and the herder imports this package too: only a
# worker started for *this* app may load models and beat.
_serving: ModelSpec | None = None
#: Prefork children of this worker, as started (``-c`` overrides settings).
_concurrency = 1
_heartbeat: Heartbeat | None = None


@worker_init.connect
def _check_before_fork(sender: Any = None, **_: Any) -> None:
    global _serving, _concurrency
    if getattr(sender, "app", None) is not app:
        return
    try:
        spec = runtime.check_startup(get_settings())
    except LlamasError as exc:
        # SystemExit passes through Celery's signal dispatch, which would
        # otherwise log an ordinary exception and start a useless worker.
        print(f"llamas worker refuses to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _serving, _concurrency = spec, int(getattr(sender, "concurrency", 0) or 1)


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    if _serving is not None:
        runtime.start_process(get_settings(), current_process().index, _concurrency)


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    if _serving is None:
        return
    settings, spec = get_settings(), _serving
    hostname = sender.hostname

    def describe() -> dict[str, Any]:
        return {
            "worker": hostname,
            "model": spec.name,
            "model_id": spec.model_id,
            "queue": settings.queue,
            "slots": _concurrency,
            "gpus": settings.gpu_ids,
            "busy": len(active_requests),
        }

    _heartbeat = Heartbeat(redis.Redis.from_url(settings.redis_url), describe, settings.heartbeat_interval_s)
    _heartbeat.start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
