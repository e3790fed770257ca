"""Token streams: a Redis stream per job that requesters can follow live.

Events are ``start`` (one per attempt: a reader drops what an earlier,
interrupted attempt wrote), ``token`` (a piece of text), then ``end`` (with
the finish reason) or ``error``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import redis

from llama_tasks.constants import STREAM_PREFIX


def key(job_id: str) -> str:
    return STREAM_PREFIX + job_id


class StreamWriter:
    """Appends one attempt's events to a job's stream."""

    def __init__(self, r: redis.Redis, job_id: str, attempt: int, ttl_s: int) -> None:
        self._r, self._key, self._attempt, self._ttl_s = r, key(job_id), str(attempt), ttl_s

    def _add(self, event: str, **fields: str) -> None:
        entry: dict[Any, Any] = {"event": event, "attempt": self._attempt, **fields}
        self._r.xadd(self._key, entry)

    def start(self, worker: str, pid: int) -> None:
        pipe = self._r.pipeline()
        pipe.xadd(
            self._key, {"event": "start", "attempt": self._attempt, "worker": worker, "pid": pid}
        )
        pipe.expire(self._key, self._ttl_s)
        pipe.execute()

    def token(self, text: str) -> None:
        self._add("token", text=text)

    def end(self, finish_reason: str) -> None:
        self._add("end", finish_reason=finish_reason)
        self._r.expire(self._key, self._ttl_s)

    def error(self, error: str, message: str) -> None:
        self._add("error", error=error, message=message)
        self._r.expire(self._key, self._ttl_s)


def follow(r: redis.Redis, job_id: str, timeout_s: float = 60.0) -> Iterator[dict[str, str]]:
    """Yield a job's events as they arrive, until ``end`` or ``error``.

    Raises ``TimeoutError`` when no event arrives for ``timeout_s``.
    """
    last = "0-0"
    while True:
        batch = cast(list[Any], r.xread({key(job_id): last}, block=int(timeout_s * 1000), count=100))
        if not batch:
            raise TimeoutError(f"no stream event for job {job_id} in {timeout_s}s")
        for entry_id, raw in batch[0][1]:
            last = entry_id
            event = {
                (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()
            }
            yield event
            if event["event"] in ("end", "error"):
                return


def collect_text(events: Iterator[dict[str, str]]) -> tuple[str, dict[str, str]]:
    """Join the token text of the last attempt; return it with the closing event."""
    text: list[str] = []
    last: dict[str, str] = {}
    for event in events:
        if event["event"] == "start":
            text = []
        elif event["event"] == "token":
            text.append(event["text"])
        last = event
    return "".join(text), last
