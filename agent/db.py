"""Connections to the agent's own databases: its outcomes and its paper exchange.

The agent is an ordinary requester: it never opens the herder's ledger, so it
keeps its own small engine factory rather than the herder's. A SQLite file
(the default, under the home) gets its directory made, WAL (readers never
block the writer) and a busy timeout (a writer waits for the lock instead of
failing at once); PostgreSQL takes the same code. Every write of the agent is
a conditional update or an insert guarded by a key, so nothing here needs
the herder's ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

#: How long a SQLite writer waits for the write lock before failing, in ms.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str) -> Engine:
    """Open an engine on the database at ``url`` (a SQLite file or PostgreSQL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # A bare postgresql:// would pick psycopg2, which is not a dependency.
        parsed = parsed.set(drivername="postgresql+psycopg")
    # pre_ping: the agent outlives database restarts and idle-connection reaping.
    # hide_parameters: a database error must not print a request into a log.
    return create_engine(parsed, pool_pre_ping=True, hide_parameters=True)


def _sqlite_engine(url: str) -> Engine:
    """Open a SQLite engine in WAL mode with a busy timeout, making the file's directory."""
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """The session factory of one of the agent's databases."""
    # expire_on_commit=False: a tick written in one transaction is read by
    # its caller after the commit, with its session closed.
    return sessionmaker(engine, expire_on_commit=False)
