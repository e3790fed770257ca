"""Fixtures of the herder's tests: a real ledger on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from router.db import make_engine, make_sessionmaker, upgrade

#: Where the tests look for PostgreSQL when LLAMAS_TEST_POSTGRES_URL is unset.
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: How long the probe waits for PostgreSQL before the postgres tests skip.
PROBE_TIMEOUT_S = 3


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a PostgreSQL that answers; skips (or, when configured, fails) otherwise."""
    configured = os.environ.get("LLAMAS_TEST_POSTGRES_URL")
    url = configured or DEFAULT_POSTGRES_URL
    probe = make_engine(
        make_url(url)
        .update_query_dict({"connect_timeout": str(PROBE_TIMEOUT_S)})
        .render_as_string(hide_password=False)
    )
    try:
        with probe.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = f"no PostgreSQL answers at {make_url(url)!r}: {exc.orig}"
        if configured:
            # Asked for explicitly: a missing server is a broken setup, not a skip.
            pytest.fail(f"LLAMAS_TEST_POSTGRES_URL is set but {reason}")
        pytest.skip(f"{reason} (set LLAMAS_TEST_POSTGRES_URL to point at one)")
    finally:
        probe.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of an empty database: a fresh SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        # A directory that does not exist yet: make_engine must create it.
        yield f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'home' / 'ledger.db'}"
        return
    base: str = request.getfixturevalue("postgres_url")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = make_engine(base)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        # Every connection of the test sees only its own schema, so tests
        # (and alembic_version) never meet another test's tables.
        yield (
            make_url(base)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def session_factory(ledger_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a ledger migrated to head."""
    upgrade(ledger_url)
    engine = make_engine(ledger_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()
