"""A herder and a gateway that count their database round trips, for ``tests.bench.redis_ops``.

``celery -A tests.bench.sql_count worker -Q herder …`` runs the herder's own
Celery app and ``uvicorn tests.bench.sql_count:gateway`` the gateway's app,
in processes where every statement, BEGIN, COMMIT and ROLLBACK sent through
SQLAlchemy is counted (as ``tests.bench.db_latency`` delays the same round
trips). After each COMMIT or ROLLBACK a process writes its totals so far to
``$LLAMAS_BENCH_SQL_COUNT_DIR/<pid>.json``: prefork children may end without
running ``atexit``, and the reader sums the files of every process.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

#: Environment variable: the folder each process writes its counts into (unset: nothing is counted).
COUNT_DIR_ENV = "LLAMAS_BENCH_SQL_COUNT_DIR"
#: What is counted: round trips by kind, and the statements that take locks.
KINDS = ("statement", "begin", "commit", "rollback", "for_update", "skip_locked", "advisory")

_counts = dict.fromkeys(KINDS, 0)
_lock = threading.Lock()


def _reset() -> None:
    # A forked child (a prefork pool process) starts from nothing: its parent's counts are in the parent's file.
    for kind in _counts:
        _counts[kind] = 0


os.register_at_fork(after_in_child=_reset)


def classify(statement: str) -> list[str]:
    """The kinds one statement counts under: always ``statement``, and the locks it takes."""
    text = statement.upper()
    kinds = ["statement"]
    if "FOR UPDATE" in text:
        kinds.append("for_update")
    if "SKIP LOCKED" in text:
        kinds.append("skip_locked")
    if "PG_ADVISORY" in text or "PG_TRY_ADVISORY" in text:
        kinds.append("advisory")
    return kinds


def install(directory: Path) -> None:
    """Count every round trip of every engine this process makes, into ``directory/<pid>.json``."""
    directory.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path = directory / f"{os.getpid()}.json"
        # One temporary file per thread (the gateway commits from several at once); the rename is atomic,
        # so a reader never sees half a file.
        tmp = directory / f"{os.getpid()}-{threading.get_ident()}.tmp"
        with _lock:
            text = json.dumps(_counts)
        tmp.write_text(text)
        tmp.replace(path)

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        with _lock:
            for kind in classify(statement):
                _counts[kind] += 1

    def on(kind: str) -> Any:
        def count(*_: Any, **__: Any) -> None:
            with _lock:
                _counts[kind] += 1
            if kind != "begin":
                save()

        return count

    event.listen(Engine, "before_cursor_execute", on_statement)
    for kind in ("begin", "commit", "rollback"):
        event.listen(Engine, kind, on(kind))


def read(directory: Path) -> dict[str, int]:
    """The totals of every process that has written into ``directory`` so far."""
    totals = dict.fromkeys(KINDS, 0)
    for path in directory.glob("*.json"):
        for kind, n in json.loads(path.read_text()).items():
            totals[kind] = totals.get(kind, 0) + int(n)
    return totals


if os.environ.get(COUNT_DIR_ENV):
    install(Path(os.environ[COUNT_DIR_ENV]))


def __getattr__(name: str) -> Any:
    # Built on first use, once every engine is counted: ``app`` for ``celery -A``, ``gateway`` for uvicorn.
    if name == "app":
        from router import app

        return app
    if name == "gateway":
        from router.api import app as gateway

        return gateway
    raise AttributeError(name)
