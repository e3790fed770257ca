"""The admin's Python API for the herd: ``HerdAdmin().workers()`` and ``.init(worker, model)``.

For whoever runs the herder (it signs Inits with the herder's private key,
read from ``LLAMAS_HOME``); ``llamas workers`` is this, on the command line.
Requesters use ``router.client.Herder`` instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from llama_tasks import control, registry, signing
from llama_tasks.heartbeat import read_herd
from router.core import broker_access, db, herd_control
from router.core.herd_control import WorkerLine
from router.core.settings import HerderSettings, get_settings

#: How long ``init`` waits by default for the worker to serve the new model (a drain, then a load).
INIT_TIMEOUT_S = 300.0


class HerdAdmin:
    """List the herd and move workers between models. Nothing connects until a method is called."""

    def __init__(self, settings: HerderSettings | None = None) -> None:
        self.settings = settings or get_settings()
        self._redis: redis.Redis | None = None

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.redis_url)
        return self._redis

    def herd(self) -> list[dict[str, Any]]:
        """Every live worker's latest heartbeat."""
        return read_herd(self.redis)

    def workers(self) -> list[WorkerLine]:
        return herd_control.lines(self.herd())

    def init(self, worker: str, model: str, *, grace_s: float = control.GRACE_S, wait: bool = True,
             timeout_s: float = INIT_TIMEOUT_S,
             on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Tell ``worker`` to serve ``model`` (a registered name or sha256).

        With ``wait`` (the default), returns the worker's heartbeat once it
        serves the model, and raises ``InitRefused`` (with the worker's reason;
        it keeps serving what it had) or ``InitTimedOut``; without, returns
        ``{"worker", "model", "nonce"}`` at once.
        """
        key = signing.load_private(self.settings.private_key_file)
        models = registry.load_registry(self.settings.models_file)
        db.upgrade(self.settings.ledger_url)
        engine = db.make_engine(self.settings.ledger_url)
        try:
            with db.make_sessionmaker(engine).begin() as session:
                spec, nonce = herd_control.init(
                    self.redis, key, self.herd(), models, worker, model, time.time(), grace_s=grace_s,
                    may_serve=lambda name, target: broker_access.may_serve(session, name, target))
        finally:
            engine.dispose()
        if not wait:
            return {"worker": worker, "model": spec.name, "nonce": nonce}
        return herd_control.wait(self.herd, worker, spec.name, nonce, timeout_s, on_change=on_change)
