"""The Celery application of the inference workers and its lifecycle hooks.

Start a worker with ``celery -A llama_tasks worker -Q llama.<model>``. By
default it is one process with a pool of ``LLAMAS_SLOTS`` threads: the
process loads the model once into a batch engine before it consumes, and the
task threads hand their jobs to that engine, which decodes them together. One
such process serves one GPU (or the CPU); start one per GPU (``llamas up``
does). The main process checks the model and key first (refusing to start
otherwise) and publishes heartbeats with the engine's slots and busy slots.

Other pools are refused: a prefork child would hold a model copy of its own
and decode one job at a time.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker.state import active_requests

from llama_tasks import broker, lifeline, runtime
from llama_tasks.errors import LlamasError, OneGpuPerProcess, UnsupportedPool
from llama_tasks.heartbeat import Heartbeat
from llama_tasks.placement import place
from llama_tasks.registry import ModelSpec
from llama_tasks.settings import cpu_count, get_settings

log = logging.getLogger(__name__)

# An operator's worker runs under a broker user restricted to its role (llama_tasks.broker).
_operator = get_settings().operator
app = Celery("llama_tasks", amqp=broker.OperatorAMQP if _operator else None)
app.config_from_object("celeryconfig")
app.conf.task_default_queue = get_settings().queue
if _operator:
    app.conf.update(broker.operator_conf(_operator, dict(app.conf.broker_transport_options or {})))
# The batching layout is the default: one process, one engine, a task thread per slot.
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = get_settings().slots
# An embedded beat (-B) dies with this worker's process.
lifeline.connect_celery_signals()

# Signals are process-global, and the herder imports this package too: only a
# worker started for *this* app may load models and beat.
_serving: ModelSpec | None = None
#: Task slots of this worker as started (``-c`` overrides settings).
_concurrency = 1
_heartbeat: Heartbeat | None = None
#: Exit status of a worker whose engine stalled (EX_TEMPFAIL): restart it.
STALLED_EXIT = 75
#: How long a stalled worker waits for its task threads to store their jobs' outcomes.
STALL_REPORT_S = 10.0


def _pool_name(sender: Any) -> str:
    """The pool this worker runs, as ``-P`` names it.

    Celery reads an explicit ``-P prefork`` as "no choice" and takes our
    configured default instead, so the command line is read too: a pool
    asked for must never be silently replaced.
    """
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg in ("-P", "--pool") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
        if arg.startswith("-P"):
            return arg[2:].lstrip("=")
    return getattr(getattr(sender, "pool_cls", None), "__module__", "").rsplit(".", 1)[-1]


@worker_init.connect
def _check_and_load(sender: Any = None, **_: Any) -> None:
    global _serving, _concurrency
    if getattr(sender, "app", None) is not app:
        return
    settings = get_settings()
    _concurrency = int(getattr(sender, "concurrency", 0) or 1)
    try:
        pool = _pool_name(sender)
        if pool not in ("threads", "thread"):
            raise UnsupportedPool(pool)
        spec = runtime.check_startup(settings)
        if len(settings.gpu_ids) > 1:
            raise OneGpuPerProcess(settings.gpus)
        gpu = settings.gpu_ids[0] if settings.gpu_ids else None
        runtime.start_process(settings, place(gpu, settings.threads or cpu_count()), _concurrency,
                              on_stall=_exit_stalled)
    except LlamasError as exc:
        # SystemExit passes through Celery's signal dispatch, which would
        # otherwise log an ordinary exception and start a useless worker.
        print(f"llamas worker refuses to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _serving = spec


def _exit_stalled() -> None:
    """The engine is stuck inside llama.cpp for good: leave the herd, let the tasks report, exit.

    Every job the engine held has been answered (the stuck one with what it
    made, the others with a retryable failure); their task threads store
    those outcomes within moments. No thread can free a core that C code
    spins on, so the process ends — also through a warm shutdown, which
    would otherwise wait on those threads forever — and its supervisor
    (``llamas up``, systemd) starts a fresh one.
    """
    if _heartbeat is not None:
        _heartbeat.stop()
    deadline = time.monotonic() + STALL_REPORT_S
    while active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    log.error("exiting with status %d: the engine stalled; a supervisor should start this worker again",
              STALLED_EXIT)
    logging.shutdown()
    os._exit(STALLED_EXIT)


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    if _serving is None:
        return
    settings, spec = get_settings(), _serving
    hostname = settings.worker_name(sender.hostname)
    loaded = runtime.context()
    # Loaded before Celery set up its logging: said now.
    log.info("%s", loaded.describe())

    def describe() -> dict[str, Any]:
        return {
            "worker": hostname,
            "model": spec.name,
            "model_id": spec.model_id,
            "queue": settings.queue,
            "slots": _concurrency,
            "gpus": settings.gpu_ids,
            # Sequences in the engine's slots (a job with n choices holds n).
            "busy": loaded.engine.busy(),
            "jobs": len(active_requests),
            "n_ctx": settings.n_ctx,
        }

    # Every beat is signed, so the herder can tell whose worker it is.
    attest = loaded.signer.attest_heartbeat
    # A beat vouches for progress: a worker whose engine stopped stepping drops out of the herd.
    _heartbeat = Heartbeat(redis.Redis.from_url(settings.redis_url), describe, settings.heartbeat_interval_s,
                           attest=attest, healthy=loaded.engine.healthy)
    _heartbeat.start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
