"""Alembic environment of the herder's database, driven by ``router.core.db.upgrade``.

``upgrade`` hands over an open connection (in ``config.attributes``) inside
the transaction that holds the upgrade lock; the ``alembic`` command line,
given a config with ``sqlalchemy.url``, gets an engine from ``make_engine``
so SQLite is opened with the same pragmas either way.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from router.core.db import make_engine
from router.core.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    """Point Alembic at ``connection`` with the options both backends need."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; autogenerate must emit batch ops.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Write the migrations as SQL (``alembic upgrade --sql``) without a database."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the given connection, or on a fresh engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic config has no sqlalchemy.url and no connection")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
