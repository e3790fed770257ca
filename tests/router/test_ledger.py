"""The ledger keeps the books: on SQLite and PostgreSQL, under concurrency, and via the CLI."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from router.cli.accounts import accounts_app, ledger_app
from router.core import ledger
from router.core.db import alembic_config, make_engine, upgrade
from router.core.errors import (
    AccountExists,
    HoldExceeded,
    InsufficientFunds,
    InvalidAccountName,
    InvalidAmount,
    SystemAccount,
    UnknownAccount,
)
from router.core.models import ESCROW, REVENUE, WORLD, Base
from router.core.settings import get_settings

Factory = sessionmaker[Session]


def balances(factory: Factory, *names: str) -> dict[str, int]:
    """Committed balances of the named accounts."""
    with factory() as session:
        return {n: ledger.balance(session, ledger.account_by_name(session, n)) for n in names}


def make_account(factory: Factory, name: str, deposit: int = 0) -> str:
    """Create a funded account in its own transaction; returns its API key."""
    with factory.begin() as session:
        _, api_key = ledger.create_account(session, name, deposit=deposit)
    return api_key


def problems(factory: Factory) -> list[str]:
    with factory() as session:
        return ledger.check(session)


# --- movements ---------------------------------------------------------------


def test_deposit_hold_capture_release_move_the_right_amounts(session_factory: Factory) -> None:
    make_account(session_factory, "alice", deposit=100)
    with session_factory.begin() as session:
        alice = ledger.account_by_name(session, "alice")
        ledger.hold(session, alice, 60, "job-1")
        assert ledger.held_for(session, "job-1") == 60
        ledger.capture(session, 25, "job-1")
        ledger.release(session, alice, 35, "job-1")
        assert ledger.held_for(session, "job-1") == 0
        ledger.hold(session, alice, 30, "job-2")
        ledger.withdraw(session, alice, 5)
        assert alice.balance == 100 - 60 + 35 - 30 - 5  # expired and re-read

    assert balances(session_factory, "alice", ESCROW, REVENUE, WORLD) == {
        "alice": 40,
        ESCROW: 30,
        REVENUE: 25,
        WORLD: -95,
    }
    with session_factory() as session:
        assert ledger.held_for(session, "job-2") == 30
        assert ledger.held_for(session, "no-such-job") == 0
    assert problems(session_factory) == []


def test_a_refused_movement_changes_nothing(session_factory: Factory) -> None:
    make_account(session_factory, "bob", deposit=50)
    with session_factory.begin() as session:
        bob = ledger.account_by_name(session, "bob")
        with pytest.raises(InsufficientFunds) as refused:
            ledger.hold(session, bob, 51, "job-1")
        assert refused.value.as_dict() == {"account": "bob", "balance": 50, "needed": 51}
        with pytest.raises(InsufficientFunds) as refused:
            ledger.withdraw(session, bob, 80)
        assert (refused.value.balance, refused.value.needed) == (50, 80)
        ledger.hold(session, bob, 50, "job-2")
        with pytest.raises(HoldExceeded) as exceeded:
            ledger.capture(session, 51, "job-2")
        assert (exceeded.value.held, exceeded.value.needed) == (50, 51)
        ledger.capture(session, 20, "job-2")
        with pytest.raises(HoldExceeded):
            ledger.release(session, bob, 31, "job-2")
        with pytest.raises(HoldExceeded):
            ledger.release(session, bob, 1, "never-held")
    assert balances(session_factory, "bob", ESCROW, REVENUE) == {"bob": 0, ESCROW: 30, REVENUE: 20}
    assert problems(session_factory) == []


@pytest.mark.parametrize("amount", [0, -1, 1.0, 10.5, True, "5", None, 2**63])
def test_invalid_amounts_are_refused(session_factory: Factory, amount: Any) -> None:
    make_account(session_factory, "carol", deposit=10)
    with session_factory.begin() as session:
        carol = ledger.account_by_name(session, "carol")
        moves: list[Callable[[], object]] = [
            lambda: ledger.deposit(session, carol, amount),
            lambda: ledger.withdraw(session, carol, amount),
            lambda: ledger.hold(session, carol, amount, "job-1"),
            lambda: ledger.capture(session, amount, "job-1"),
            lambda: ledger.release(session, carol, amount, "job-1"),
        ]
        for move in moves:
            with pytest.raises(InvalidAmount):
                move()
    if amount != 0:
        with session_factory.begin() as session, pytest.raises(InvalidAmount):
            ledger.create_account(session, "dave", deposit=amount)
    assert balances(session_factory, "carol") == {"carol": 10}
    assert problems(session_factory) == []


def test_system_accounts_cannot_be_funded_spent_or_keyed(session_factory: Factory) -> None:
    with session_factory.begin() as session:
        escrow = ledger.account_by_name(session, ESCROW)
        with pytest.raises(SystemAccount):
            ledger.deposit(session, escrow, 5)
        with pytest.raises(SystemAccount):
            ledger.hold(session, escrow, 5, "job-1")
        with pytest.raises(SystemAccount):
            ledger.rotate_key(session, ledger.account_by_name(session, REVENUE))
        with pytest.raises(AccountExists):
            ledger.create_account(session, WORLD)
        with pytest.raises(InvalidAccountName):
            ledger.create_account(session, " ")


def test_a_taken_name_leaves_the_transaction_usable(session_factory: Factory) -> None:
    make_account(session_factory, "erin")
    with session_factory.begin() as session:
        with pytest.raises(AccountExists):
            ledger.create_account(session, "erin")
        # On PostgreSQL a failed INSERT outside a savepoint would abort this.
        ledger.create_account(session, "frank", deposit=7)
    assert balances(session_factory, "erin", "frank") == {"erin": 0, "frank": 7}


# --- keys --------------------------------------------------------------------


def test_api_keys_are_stored_only_hashed_and_look_up(session_factory: Factory) -> None:
    api_key = make_account(session_factory, "grace", deposit=1)
    assert api_key.startswith("llm_") and len(api_key) > 40
    with session_factory() as session:
        row = session.execute(text("SELECT * FROM accounts WHERE name = 'grace'")).one()
        assert api_key not in [str(value) for value in row]
        assert row.api_key_hash == hashlib.sha256(api_key.encode()).hexdigest()
        assert ledger.account_by_key(session, api_key).name == "grace"
        with pytest.raises(UnknownAccount) as unknown:
            ledger.account_by_key(session, api_key + "x")
        assert api_key not in str(unknown.value)

    with session_factory.begin() as session:
        new_key = ledger.rotate_key(session, ledger.account_by_name(session, "grace"))
    with session_factory() as session:
        assert ledger.account_by_key(session, new_key).name == "grace"
        with pytest.raises(UnknownAccount):
            ledger.account_by_key(session, api_key)


# --- concurrency -------------------------------------------------------------


def run_together(n: int, action: Callable[[int], bool]) -> list[bool]:
    """Run ``action(i)`` for i in range(n) on n threads released at the same moment."""
    start = threading.Barrier(n)

    def worker(i: int) -> bool:
        start.wait()
        return action(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(worker, range(n)))


def test_concurrent_holds_never_overdraw(session_factory: Factory) -> None:
    make_account(session_factory, "heidi", deposit=100)

    def try_hold(i: int) -> bool:
        try:
            with session_factory.begin() as session:
                ledger.hold(session, ledger.account_by_name(session, "heidi"), 10, f"job-{i}")
        except InsufficientFunds:
            return False
        return True

    results = run_together(50, try_hold)

    assert results.count(True) == 10
    assert balances(session_factory, "heidi", ESCROW) == {"heidi": 0, ESCROW: 100}
    assert problems(session_factory) == []


def test_concurrent_holds_and_releases_on_one_account_do_not_deadlock(
    session_factory: Factory,
) -> None:
    make_account(session_factory, "ivan", deposit=200)
    with session_factory.begin() as session:
        ivan = ledger.account_by_name(session, "ivan")
        for i in range(10):
            ledger.hold(session, ivan, 10, f"old-{i}")

    def hold_or_release(i: int) -> bool:
        with session_factory.begin() as session:
            ivan = ledger.account_by_name(session, "ivan")
            if i % 2:
                ledger.release(session, ivan, 10, f"old-{i // 2}")
            else:
                ledger.hold(session, ivan, 10, f"new-{i // 2}")
        return True

    assert all(run_together(20, hold_or_release))
    assert balances(session_factory, "ivan", ESCROW) == {"ivan": 100, ESCROW: 100}
    assert problems(session_factory) == []


# --- audit -------------------------------------------------------------------


def test_check_reports_a_tampered_balance(session_factory: Factory) -> None:
    make_account(session_factory, "judy", deposit=10)
    with session_factory.begin() as session:
        session.execute(text("UPDATE accounts SET balance = balance + 5 WHERE name = 'judy'"))
    found = problems(session_factory)
    assert any("'judy'" in p and "15" in p and "10" in p for p in found)
    assert any("sum to 5" in p for p in found)


def test_check_reports_escrow_that_open_holds_do_not_explain(session_factory: Factory) -> None:
    make_account(session_factory, "ken", deposit=10)
    with session_factory.begin() as session:
        ledger.hold(session, ledger.account_by_name(session, "ken"), 10, "job-1")
        # Money taken out of escrow without a capture or release.
        session.execute(text("UPDATE accounts SET balance = balance - 4 WHERE name = 'escrow'"))
        session.execute(text("UPDATE accounts SET balance = balance + 4 WHERE name = 'revenue'"))
    found = problems(session_factory)
    assert any("escrow balance 6 but open holds sum to 10" in p for p in found)


# --- migrations --------------------------------------------------------------


def test_migrations_upgrade_a_fresh_database_to_head(ledger_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(ledger_url)).get_current_head()
    upgrade(ledger_url)
    upgrade(ledger_url)  # a second run, as every CLI command does, changes nothing
    engine = make_engine(ledger_url)
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head
            assert {"accounts", "transfers"} <= set(inspect(connection).get_table_names())
            names = connection.execute(
                text("SELECT name FROM accounts WHERE kind = 'system' ORDER BY id")
            ).scalars()
            assert list(names) == [WORLD, ESCROW, REVENUE]
            # The hand-written migration creates exactly what the models declare.
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


def test_the_database_refuses_a_negative_balance(session_factory: Factory) -> None:
    make_account(session_factory, "leo", deposit=3)
    with pytest.raises(IntegrityError, match="(?i)check"), session_factory.begin() as session:
        session.execute(text("UPDATE accounts SET balance = -1 WHERE name = 'leo'"))
    with session_factory.begin() as session:
        session.execute(text("UPDATE accounts SET balance = -1 WHERE name = 'world'"))


# --- CLI ---------------------------------------------------------------------


@pytest.fixture
def cli_env(ledger_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Invoke a CLI sub-app against the test ledger."""
    monkeypatch.setenv("LLAMAS_DATABASE_URL", ledger_url)
    get_settings.cache_clear()
    runner = CliRunner()

    def invoke(app: Any, *args: str) -> Any:
        return runner.invoke(app, list(args))

    yield invoke
    get_settings.cache_clear()


def test_cli_create_deposit_balance_check(cli_env: Callable[..., Any], ledger_url: str) -> None:
    created = cli_env(accounts_app, "create", "mallory", "--deposit", "30")
    assert created.exit_code == 0, created.output
    api_key = next(line for line in created.stdout.splitlines() if line.startswith("llm_"))
    assert "only once" in created.stdout

    deposited = cli_env(accounts_app, "deposit", "mallory", "12")
    assert deposited.exit_code == 0, deposited.output
    withdrawn = cli_env(accounts_app, "withdraw", "mallory", "2")
    assert withdrawn.exit_code == 0, withdrawn.output
    shown = cli_env(accounts_app, "balance", "mallory")
    assert shown.exit_code == 0 and shown.stdout.strip() == "mallory: 40"
    checked = cli_env(ledger_app, "check")
    assert checked.exit_code == 0 and "balance" in checked.stdout

    engine = make_engine(ledger_url)
    try:
        with Session(engine) as session:
            assert ledger.account_by_key(session, api_key).name == "mallory"
    finally:
        engine.dispose()

    rotated = cli_env(accounts_app, "keys", "rotate", "mallory")
    assert rotated.exit_code == 0 and rotated.stdout.startswith("llm_")
    assert api_key not in rotated.stdout


def test_cli_errors_are_one_red_line_and_exit_1(
    cli_env: Callable[..., Any], ledger_url: str
) -> None:
    for args in (("deposit", "nobody", "5"), ("withdraw", "escrow", "5")):
        failed = cli_env(accounts_app, *args)
        assert failed.exit_code == 1
        assert isinstance(failed.exception, SystemExit)  # not a traceback
        assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error:")
    assert "no such account: nobody" in cli_env(accounts_app, "balance", "nobody").stderr
    assert cli_env(accounts_app, "create", "oscar").exit_code == 0
    assert "already exists" in cli_env(accounts_app, "create", "oscar").stderr
    overdrawn = cli_env(accounts_app, "withdraw", "oscar", "1")
    assert overdrawn.exit_code == 1 and "has 0, needs 1" in overdrawn.stderr

    engine = make_engine(ledger_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE accounts SET balance = 9 WHERE name = 'oscar'"))
    finally:
        engine.dispose()
    checked = cli_env(ledger_app, "check")
    assert checked.exit_code == 1
    assert len(checked.stderr.splitlines()) == 2  # oscar's balance, and the sum
