"""A herder's reader of the results stream: settles what workers publish, in batches.

Workers add each finished attempt's result to ``llama_tasks.constants.RESULTS_STREAM``
(``llama_tasks.results``). Every herder process reads it in the consumer
group ``RESULTS_GROUP``, so each entry goes to one herder; a batch of
whatever has arrived is settled in one transaction, then acknowledged and
deleted. Entries a herder took but never acknowledged (it was killed) are
claimed by another after ``RECLAIM_IDLE_MS``; settling is idempotent, so an
entry settled twice changes nothing. Anything still missing is settled by
the tick from the result store (``HerderService.reconcile``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy.exc import SQLAlchemyError

from llama_tasks.constants import RESULTS_GROUP, RESULTS_STREAM
from router.core.service import HerderService

log = logging.getLogger(__name__)

#: Results settled together at most.
BATCH = 64
#: How long one read waits for a result before looking again.
BLOCK_MS = 1000
#: An entry taken this long ago and never acknowledged belonged to a dead herder.
RECLAIM_IDLE_MS = 30_000
#: How often the reader looks for such entries.
RECLAIM_EVERY_S = 10.0
#: Pause after Redis or the ledger failed, before trying again.
RETRY_S = 1.0

Entry = tuple[bytes, dict[bytes, bytes]]


def parse(entries: list[Entry]) -> list[tuple[str, dict[str, Any]]]:
    """``(task id, result document)`` of each well-formed entry; the others are skipped."""
    found = []
    for entry_id, fields in entries:
        try:
            doc = json.loads(fields[b"doc"])
        except (KeyError, ValueError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("task_id"), str):
            log.warning("results stream: entry %s is not a result; dropped", entry_id.decode())
            continue
        found.append((doc["task_id"], doc))
    return found


class ResultReader:
    """Reads the results stream as one consumer of the herders' group and settles what it reads."""

    def __init__(self, service: Callable[[], HerderService], r: redis.Redis, consumer: str) -> None:
        self._service = service
        self._redis = r
        self.consumer = consumer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamas-result-reader", daemon=True)

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            self._redis.xgroup_create(RESULTS_STREAM, RESULTS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run_once(self, block_ms: int | None = BLOCK_MS) -> int:
        """Read and settle one batch of new entries; returns how many entries were read."""
        reply: Any = self._redis.xreadgroup(RESULTS_GROUP, self.consumer, {RESULTS_STREAM: ">"}, count=BATCH,
                                            block=block_ms)
        entries: list[Entry] = reply[0][1] if reply else []
        self._settle(entries)
        return len(entries)

    def reclaim(self, min_idle_ms: int = RECLAIM_IDLE_MS) -> int:
        """Take over and settle entries another consumer read but never acknowledged."""
        reply: Any = self._redis.xautoclaim(RESULTS_STREAM, RESULTS_GROUP, self.consumer, min_idle_ms, "0-0",
                                            count=BATCH)
        entries: list[Entry] = [e for e in reply[1] if e[1]]  # deleted entries come back empty
        self._settle(entries)
        return len(entries)

    def _settle(self, entries: list[Entry]) -> None:
        if not entries:
            return
        results = parse(entries)
        if results:
            self._service().on_results(results)
        ids = [entry_id for entry_id, _ in entries]
        pipe = self._redis.pipeline()
        pipe.xack(RESULTS_STREAM, RESULTS_GROUP, *ids)
        pipe.xdel(RESULTS_STREAM, *ids)  # settled: the completion need not stay in Redis
        pipe.execute()

    def start(self) -> ResultReader:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        next_reclaim = 0.0
        while not self._stop.is_set():
            try:
                self.ensure_group()
                while not self._stop.is_set():
                    if time.monotonic() >= next_reclaim:
                        self.reclaim()
                        next_reclaim = time.monotonic() + RECLAIM_EVERY_S
                    self.run_once()
            except (redis.RedisError, SQLAlchemyError, OSError) as exc:
                # Redis or the ledger is away: what is unacknowledged stays in the stream.
                log.warning("settling results paused: %s", type(exc).__name__)
                self._stop.wait(RETRY_S)
            except Exception as exc:  # by type only: a result may quote its text
                log.error("settling results failed (%s); trying again", type(exc).__name__)
                self._stop.wait(RETRY_S)
