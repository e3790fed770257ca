"""Worker heartbeats: how the herder knows its herd.

The worker's main process writes one JSON document per worker to Redis every
``heartbeat_interval_s`` with a TTL of a few intervals, so a worker that dies
drops out of the herd on its own. A worker run for an operator signs each
beat (worker, pid, operator, time and interval) with the operator's key, so a
reader can tell whose worker it is and that the beat is recent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from llama_tasks.constants import HEARTBEAT_TTL_INTERVALS, HERD_PREFIX

log = logging.getLogger(__name__)

#: Turns a heartbeat document into the one published (an operator's worker signs it).
Attest = Callable[[dict[str, Any]], dict[str, Any]]


def beat(r: redis.Redis, doc: dict[str, Any], interval_s: float) -> None:
    ttl_ms = int(interval_s * HEARTBEAT_TTL_INTERVALS * 1000)
    r.set(HERD_PREFIX + doc["worker"], json.dumps(doc), px=max(ttl_ms, 1000))


def read_herd(r: redis.Redis) -> list[dict[str, Any]]:
    """Every live worker's latest heartbeat."""
    keys = sorted(r.scan_iter(match=HERD_PREFIX + "*", count=500))
    docs = r.mget(keys) if keys else []
    return [json.loads(d) for d in docs if d]


class Heartbeat:
    """A daemon thread that publishes ``describe()`` until stopped, while ``healthy()`` says so.

    ``attest`` signs each beat (a worker run for an operator passes its
    operator's signer); None publishes beats unsigned, as the house's.
    """

    def __init__(
        self, r: redis.Redis, describe: Callable[[], dict[str, Any]], interval_s: float,
        attest: Attest | None = None, healthy: Callable[[], bool] | None = None,
    ) -> None:
        self._r, self._describe, self._interval_s = r, describe, interval_s
        self._attest = attest
        self._healthy = healthy
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamas-heartbeat", daemon=True)
        self._worker: str | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._healthy is not None and not self._healthy():
                # No beat: the herd entry expires and the herder sends nothing more here.
                log.warning("heartbeat withheld: the engine is not making progress")
                self._wake.wait(self._interval_s)
                self._wake.clear()
                continue
            try:
                doc = self._describe() | {"ts": time.time(), "pid": os.getpid(), "interval_s": self._interval_s}
                if self._attest is not None:
                    doc = self._attest(doc)
                self._worker = doc["worker"]
                beat(self._r, doc, self._interval_s)
            except redis.RedisError as exc:  # the broker may come back; keep beating
                log.warning("heartbeat failed: %s", exc)
            self._wake.wait(self._interval_s)
            self._wake.clear()

    def beat_now(self) -> None:
        """Publish the next beat at once (the worker's state changed), not at the end of the interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self._interval_s + 1)
        if self._worker:
            try:
                self._r.delete(HERD_PREFIX + self._worker)
            except redis.RedisError:
                pass
