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

A worker started with ``--no-model`` loads nothing and takes no jobs until
the herder tells it which model to serve; any worker can be told to serve
another model while it runs (``llama_tasks.switching``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import click
import redis
from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker.state import active_requests

from llama_tasks import broker, lifeline, runtime, signing
from llama_tasks.errors import LlamasError, OneGpuPerProcess, UnsupportedPool
from llama_tasks.heartbeat import Heartbeat
from llama_tasks.placement import Placement, place
from llama_tasks.registry import ModelSpec
from llama_tasks.settings import IDLE_QUEUE, cpu_count, get_settings
from llama_tasks.switching import Switcher

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
_started = False
#: Task slots of this worker as started (``-c`` overrides settings).
_concurrency = 1
_heartbeat: Heartbeat | None = None
_switcher: Switcher | None = None
_placement: Placement | None = None
_started_at = 0.0
#: Exit status of a worker whose engine stalled (EX_TEMPFAIL): restart it.
STALLED_EXIT = 75
#: How long a stalled worker waits for its task threads to store their jobs' outcomes.
STALL_REPORT_S = 10.0
#: Start with no model: listen for an Init (``llamas workers init``, or the herder's placement).
NO_MODEL = "--no-model"

app.user_options["worker"].add(click.Option(
    [NO_MODEL], is_flag=True, default=False,
    help="Start with no model loaded and take no jobs until the herder sends an Init (llamas workers init).",
))


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


def _no_model(sender: Any) -> bool:
    """Whether this worker was started with ``--no-model`` (a user option, which bootsteps get, not signals)."""
    return bool(getattr(sender, "options", {}).get("no_model")) or NO_MODEL in sys.argv[1:]


@worker_init.connect
def _check_and_load(sender: Any = None, **_: Any) -> None:
    global _started, _concurrency, _placement, _started_at
    if getattr(sender, "app", None) is not app:
        return
    _started_at = time.time()
    settings = get_settings()
    _concurrency = int(getattr(sender, "concurrency", 0) or 1)
    serve = not _no_model(sender)
    try:
        pool = _pool_name(sender)
        if pool not in ("threads", "thread"):
            raise UnsupportedPool(pool)
        runtime.check_startup(settings, serve=serve)
        if len(settings.gpu_ids) > 1:
            raise OneGpuPerProcess(settings.gpus)
        gpu = settings.gpu_ids[0] if settings.gpu_ids else None
        _placement = place(gpu, settings.threads or cpu_count())
        if serve:
            runtime.start_process(settings, _placement, _concurrency, on_stall=_exit_stalled)
    except LlamasError as exc:
        # SystemExit passes through Celery's signal dispatch, which would
        # otherwise log an ordinary exception and start a useless worker.
        print(f"llamas worker refuses to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not serve:
        # Its queues were chosen already (-Q, or the default model's): none of
        # them, only one that nothing is sent to, until an Init names a model.
        sender.app.amqp.queues.select([IDLE_QUEUE])
    _started = True


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


class _CeleryHost:
    """What ``Switcher`` changes in this process: Celery's consumer, the runtime, the heartbeat."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer

    def consume(self, queue: str) -> None:
        # Queues belong to the consumer's own thread: as Celery's add_consumer command does it.
        self._consumer.call_soon(self._consumer.add_task_queue, queue)

    def stop_consuming(self, queue: str) -> None:
        self._consumer.call_soon(self._consumer.cancel_task_queue, queue)

    def running(self) -> int:
        return len(active_requests)

    def load(self, spec: ModelSpec) -> None:
        assert _placement is not None
        loaded = runtime.start_process(get_settings(), _placement, _concurrency, on_stall=_exit_stalled, spec=spec)
        log.info("%s", loaded.describe())

    def unload(self, reason: str) -> None:
        runtime.unload(reason)

    def beat(self) -> None:
        if _heartbeat is not None:
            _heartbeat.beat_now()


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat, _switcher
    if not _started:
        return
    settings = get_settings()
    hostname = settings.worker_name(sender.hostname)
    first = runtime.loaded()
    if first is not None:
        # Loaded before Celery set up its logging: said now.
        log.info("%s", first.describe())
    signer = signing.load_operator(settings.operator, settings.signer_key_path)
    switcher = Switcher(settings, _CeleryHost(sender), redis.Redis.from_url(settings.redis_url),
                        signing.load_public(settings.public_key, settings.public_key_file), hostname, _started_at)
    switcher.serving(first.spec if first is not None else None)
    if first is None:
        log.info("serving no model: waiting for an Init (llamas workers init %s MODEL)", hostname)

    def describe() -> dict[str, Any]:
        loaded = runtime.loaded()
        return {
            "worker": hostname,
            **switcher.describe(),
            "slots": _concurrency,
            "gpus": settings.gpu_ids,
            # Sequences in the engine's slots (a job with n choices holds n).
            "busy": loaded.engine.busy() if loaded is not None else 0,
            "jobs": len(active_requests),
            "n_ctx": settings.n_ctx,
        }

    def healthy() -> bool:
        loaded = runtime.loaded()
        return loaded is None or loaded.engine.healthy()

    # Every beat is signed, so the herder can tell whose worker it is.
    # A beat vouches for progress: a worker whose engine stopped stepping drops out of the herd.
    _heartbeat = Heartbeat(redis.Redis.from_url(settings.redis_url), describe, settings.heartbeat_interval_s,
                           attest=signer.attest_heartbeat, healthy=healthy)
    _heartbeat.start()
    _switcher = switcher.start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _switcher is not None:
        _switcher.stop()
    if _heartbeat is not None:
        _heartbeat.stop()
