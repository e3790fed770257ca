"""The herd as the herder sees it: worker heartbeats read from Redis, briefly cached.

Every admission and every dispatch asks which workers are alive; heartbeats
change every ``LLAMAS_HEARTBEAT_INTERVAL_S`` and outlive a missed beat, so
a view a fraction of a second old decides exactly as well and spares a scan
of Redis per request.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from llama_tasks.heartbeat import read_herd

#: How old a cached view of the herd may be.
MAX_AGE_S = 0.25


class HerdReader:
    """A herd source (``router.core.parts.HerdSource``) over the heartbeats in Redis."""

    def __init__(self, r: redis.Redis, max_age_s: float = MAX_AGE_S) -> None:
        self._redis = r
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._herd: list[dict[str, Any]] = []

    def __call__(self, fresh: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            if fresh or time.monotonic() - self._read_at > self._max_age_s:
                self._herd = read_herd(self._redis)
                self._read_at = time.monotonic()
            return list(self._herd)
