"""A herder whose database is far away: every round trip to it waits a fixed time first.

``celery -A tests.bench.db_latency worker -Q herder …`` runs the herder's own
Celery app (``router.app``) in a process where each statement, each BEGIN and
each COMMIT or ROLLBACK sleeps ``LLAMAS_BENCH_DB_LATENCY_MS`` × 2 (there and
back) before it goes out, as if PostgreSQL ran on another machine. The sleep
holds no lock of ours and no CPU, so several herders overlap their waits as
herders on their own hosts would; locks taken in the database are held across
the wait, as they would be across a real network.
"""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

#: Environment variable: one-way latency to the database, in milliseconds (0 or unset: none).
LATENCY_ENV = "LLAMAS_BENCH_DB_LATENCY_MS"


def install(one_way_ms: float) -> None:
    """Make every engine of this process wait ``2 × one_way_ms`` before each round trip."""
    if one_way_ms <= 0:
        return
    round_trip_s = 2 * one_way_ms / 1000

    def wait(*_: Any, **__: Any) -> None:
        time.sleep(round_trip_s)

    event.listen(Engine, "before_cursor_execute", wait)
    for name in ("begin", "commit", "rollback"):
        event.listen(Engine, name, wait)


install(float(os.environ.get(LATENCY_ENV) or 0))

from router import app  # noqa: E402  (the herder's app, once every engine it makes is slowed)

__all__ = ["app"]
