"""The admin's hands on the herd: which worker serves what, and telling one to serve another model.

An Init is signed with the herder's key (the one workers verify work with),
so only whoever holds that key — the herder, its placement step, and the
admin on the herder's machine — can move a worker. The outcome comes back in
the worker's heartbeat (``llama_tasks.control``): ``wait`` follows it.

Plain functions over a Redis client and the herd as heartbeats give it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import control
from llama_tasks.control import LOADED, REFUSED, SERVING
from llama_tasks.registry import ModelSpec
from router.core.errors import InitRefused, InitTimedOut, ModelNotPermitted, UnknownModelId, UnknownWorker

#: How often ``wait`` reads the herd.
POLL_S = 0.1


@dataclass(frozen=True)
class WorkerLine:
    """One worker as ``llamas workers list`` shows it."""

    worker: str
    model: str | None
    state: str
    since: float | None
    slots: int
    busy: int
    gpus: list[int]
    last_init: dict[str, Any] | None

    @classmethod
    def of(cls, doc: dict[str, Any]) -> WorkerLine:
        return cls(worker=doc["worker"], model=doc.get("model"), state=doc.get("state", SERVING),
                   since=doc.get("since"), slots=int(doc.get("slots", 0)), busy=int(doc.get("busy", 0)),
                   gpus=list(doc.get("gpus") or []), last_init=doc.get("init"))


def lines(herd: list[dict[str, Any]]) -> list[WorkerLine]:
    return sorted((WorkerLine.of(doc) for doc in herd), key=lambda line: line.worker)


def resolve(models: dict[str, ModelSpec], model: str) -> ModelSpec:
    """A registered model by name, or by its sha256 (the model id)."""
    if model in models:
        return models[model]
    by_id = [spec for spec in models.values() if spec.model_id == model.lower()]
    if not by_id:
        raise UnknownModelId(model)
    return sorted(by_id, key=lambda spec: spec.name)[0]


def find(herd: list[dict[str, Any]], worker: str) -> dict[str, Any]:
    for doc in herd:
        if doc.get("worker") == worker:
            return doc
    raise UnknownWorker(worker, ", ".join(sorted(d["worker"] for d in herd)) or "none")


def init(r: redis.Redis, key: Ed25519PrivateKey, herd: list[dict[str, Any]], models: dict[str, ModelSpec],
         worker: str, model: str, now: float, grace_s: float = control.GRACE_S,
         may_serve: Callable[[str, str], bool] | None = None) -> tuple[ModelSpec, str]:
    """Send ``worker`` a signed Init for ``model`` (a name or a sha256); returns the model and the Init's nonce.

    ``may_serve(worker, model)`` says whether the worker's broker credential
    reaches that model's queue (``broker_access.may_serve``).
    """
    find(herd, worker)
    spec = resolve(models, model)
    if may_serve is not None and not may_serve(worker, spec.name):
        raise ModelNotPermitted(worker, spec.name)
    envelope = control.build(worker, spec.name, spec.model_id, key, now, grace_s=grace_s)
    return spec, control.send(r, envelope)


def wait(read_herd: Callable[[], list[dict[str, Any]]], worker: str, model: str, nonce: str, timeout_s: float,
         on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Follow ``worker``'s heartbeat until the Init ``nonce`` is loaded; returns that heartbeat.

    ``on_change`` gets each heartbeat whose state differs from the last
    (draining, loading…), for progress. Raises ``InitRefused`` with the
    worker's reason, ``UnknownWorker`` when the worker left the herd, or
    ``InitTimedOut``.
    """
    started = time.monotonic()
    last_state: tuple[Any, ...] | None = None
    doc: dict[str, Any] | None = None
    while time.monotonic() - started < timeout_s:
        doc = find(read_herd(), worker)
        outcome = doc.get("init") or {}
        state = (doc.get("state"), doc.get("model"), outcome.get("nonce"), outcome.get("outcome"))
        if state != last_state and on_change is not None:
            on_change(doc)
        last_state = state
        if outcome.get("nonce") == nonce:
            if outcome.get("outcome") == REFUSED:
                raise InitRefused(worker, model, outcome.get("reason") or "no reason given")
            if outcome.get("outcome") == LOADED and doc.get("state") == SERVING:
                return doc
        time.sleep(POLL_S)
    seen = f"{doc.get('state')} {doc.get('model')}" if doc else "nothing"
    raise InitTimedOut(worker, model, timeout_s, seen)

