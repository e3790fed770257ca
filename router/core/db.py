"""Connections to the ledger database: engines, sessions and migrations.

SQLite (the default, one file under the herder's home) and PostgreSQL take
the same code. SQLite needs three adjustments to behave like a server
database under concurrent writers: WAL (readers never block the writer), a
busy timeout (a waiting writer queues instead of failing at once) and
``BEGIN IMMEDIATE`` (a transaction takes the write lock when it starts, so two
writers serialize instead of deadlocking when both upgrade from a read lock).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from router.core import private_files

#: How long a SQLite writer waits for the write lock before failing, in ms.
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Directory holding Alembic's env.py and versions/, shipped inside the package.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Key of the PostgreSQL advisory lock that serializes concurrent upgrades.
UPGRADE_LOCK_KEY = 0x6C6C616D6173  # "llamas"
#: Execution option of connections that only read: SQLite starts their
#: transactions deferred, so a reader never waits for (or holds) the write lock.
READ_ONLY = "llamas_read_only"
#: SQLite's ``synchronous`` settings we offer: FULL syncs the WAL at every
#: commit; NORMAL syncs it at checkpoints only, which survives any crash of
#: our processes but may lose the last commits to a power cut or an OS crash.
SQLITE_SYNC_MODES = ("FULL", "NORMAL")
#: Files SQLite keeps beside a database in WAL mode; they hold recent commits.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def make_engine(url: str, sqlite_synchronous: str = "FULL") -> Engine:
    """Open an engine on the ledger at ``url`` (a SQLite file or PostgreSQL).

    ``sqlite_synchronous`` (one of ``SQLITE_SYNC_MODES``) applies to SQLite only.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if sqlite_synchronous not in SQLITE_SYNC_MODES:
            raise ValueError(f"sqlite_synchronous must be one of {SQLITE_SYNC_MODES}, got {sqlite_synchronous!r}")
        return _sqlite_engine(url, sqlite_synchronous)
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # A bare postgresql:// would pick psycopg2, which is not a dependency.
        parsed = parsed.set(drivername="postgresql+psycopg")
    # pre_ping: a herder outlives database restarts and idle-connection reaping.
    # hide_parameters: a database error must not print a prompt into a log.
    return create_engine(parsed, pool_pre_ping=True, hide_parameters=True)


def _sqlite_engine(url: str, synchronous: str) -> Engine:
    """Open a SQLite engine with WAL, a busy timeout and BEGIN IMMEDIATE."""
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        private_sqlite_file(Path(database).expanduser())
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver (it would emit a deferred
        # BEGIN, and none at all before SELECT, DDL or SAVEPOINT); _on_begin
        # emits our own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            # Erased text (``router.core.retention``) must not linger in free
            # space of the file: what SQLite frees it overwrites with zeros.
            cursor.execute("PRAGMA secure_delete=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def private_sqlite_file(path: Path) -> None:
    """Make the ledger file 0600 before SQLite opens it, and tighten one an older version left open.

    SQLite creates a database 0644 (less the umask) but gives its ``-wal`` and
    ``-shm`` files the database's own mode, so a database made 0600 keeps
    them 0600 too; those left by an older version are tightened here. A
    directory made for the ledger is 0700; an existing one is left as it is
    (it may be shared, and is the admin's to choose).
    """
    if not path.parent.exists():
        private_files.private_dir(path.parent)
    private_files.create_private(path)
    for name in ("", *SQLITE_SIDE_FILES):
        private_files.tighten(path.with_name(path.name + name))


def truncate_wal(sessions: sessionmaker[Session]) -> bool:
    """SQLite: copy the write-ahead log into the database and empty it; False where it could not.

    The log keeps old versions of pages (erased text among them) until it is
    overwritten; a reader still holding an old snapshot keeps it from being
    emptied (the next call does it). Nothing to do on PostgreSQL.
    """
    engine = sessions.kw["bind"]
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as connection:
        # On the driver's connection: a checkpoint cannot run inside the
        # transaction SQLAlchemy would begin.
        busy, _, _ = connection.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return not busy


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Make the session factory the herder opens every ledger transaction with."""
    # expire_on_commit=False: callers read an account's fields after commit
    # (the CLI prints them) without a second round trip.
    return sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for transactions that only read (SQLite: no write lock taken)."""
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)


def open_ledger(url: str, sqlite_synchronous: str = "FULL") -> tuple[sessionmaker[Session], sessionmaker[Session]]:
    """Migrate the ledger at ``url`` and open it: session factories for writing and for reading only."""
    upgrade(url)
    engine = make_engine(url, sqlite_synchronous)
    return make_sessionmaker(engine), make_read_sessionmaker(engine)


def alembic_config(url: str) -> Config:
    """Build Alembic's configuration in code, so no alembic.ini is needed at run time."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read a '%' in a password as a reference.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the ledger at ``url`` to ``revision`` (default: the newest)."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Every CLI command and process start upgrades; two at once
                # on a fresh database would both try to create the tables.
                # (SQLite needs nothing: BEGIN IMMEDIATE already serializes.)
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK_KEY}
                )
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()
