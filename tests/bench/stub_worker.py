"""A stand-in inference worker that answers at once, to time the herder alone.

``celery -A tests.bench.stub_worker worker -Q llama.smollm2`` serves a task
named ``llama_tasks.generate`` that returns a fixed text in the shape of
``llama_tasks.runtime.run_envelope``'s result, signed with the house's key
as a real worker signs it, without loading a model or verifying the
envelope, and publishes the same heartbeat as a real worker so
the herder dispatches to it. It exists only for ``tests.bench.compare``'s
overhead figures: never run it beside a real herd.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import worker_init, worker_ready, worker_shutdown
from celery.worker.state import active_requests

from llama_tasks import engine, results, scripted, signing
from llama_tasks.constants import GENERATE_TASK
from llama_tasks.heartbeat import Heartbeat
from llama_tasks.registry import lookup
from llama_tasks.settings import get_settings

app = Celery("stub_worker")
app.config_from_object("celeryconfig")
app.conf.task_default_queue = get_settings().queue

_heartbeat: Heartbeat | None = None


@functools.cache
def _redis() -> redis.Redis:
    """This process's client for publishing results (made on first use, after any fork)."""
    return redis.Redis.from_url(get_settings().redis_url)

# Importing llama_tasks registered its real ``generate`` as a shared task,
# which every app takes in when it is finalized (``.tasks`` finalizes this
# one): drop it, so the name below binds to the stub.
app.tasks.pop(GENERATE_TASK, None)


@functools.cache
def _signer() -> signing.OperatorSigner:
    settings = get_settings()
    return signing.load_operator(settings.operator, settings.signer_key_path)


@functools.cache
def _tokens() -> int:
    """How many tokens ``SCRIPTED_TEXT`` is (a vocab-only load: no weights)."""
    settings = get_settings()
    return engine.count_completion(engine.load_vocab(lookup(settings.models_file, settings.model)),
                                   scripted.SCRIPTED_TEXT)


@app.task(name=GENERATE_TASK, bind=True, acks_late=True, max_retries=0, shared=False)
def generate(self: Task, envelope: Any) -> dict[str, Any]:
    """Answer one envelope with ``SCRIPTED_TEXT``; trusts its fields, checks nothing but signs its answer."""
    settings = get_settings()
    model_id = lookup(settings.models_file, settings.model).model_id
    payload = envelope["payload"]
    doc = scripted.answer(payload, self.request.id, settings.worker_name(self.request.hostname), model_id,
                          completion_tokens=_tokens())
    doc = _signer().attest_result(doc, payload.get("attempt_secret", ""))
    results.publish(_redis(), doc, "", 3600)
    return doc


@worker_init.connect
def _check_task(sender: Any = None, **_: Any) -> None:
    # Never serve the real model task from here (see the ``pop`` above).
    serving = app.tasks.get(GENERATE_TASK)
    if getattr(sender, "app", None) is app and serving is not generate:
        print("stub worker: llama_tasks.generate is not the stub", file=sys.stderr)
        raise SystemExit(2)


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    if getattr(sender, "app", None) is not app:
        return
    settings = get_settings()
    spec = lookup(settings.models_file, settings.model)
    hostname = sender.hostname
    slots = int(getattr(getattr(sender, "controller", None), "concurrency", 0) or 1)

    def describe() -> dict[str, Any]:
        return {"worker": hostname, "model": spec.name, "model_id": spec.model_id, "queue": settings.queue,
                "slots": slots, "gpus": [], "busy": len(active_requests)}

    _heartbeat = Heartbeat(_redis(), describe, settings.heartbeat_interval_s)
    _heartbeat.start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
