"""No row or lock is taken by every transaction: what different requesters and models do never waits on each other.

On PostgreSQL, a transaction left open while another runs: the second sets a
lock timeout, so a wait on the first fails it instead of hanging. SQLite has
one writer by design (``BEGIN IMMEDIATE``), so these are PostgreSQL's.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from router.core import admission, ledger, queue, settlement
from router.core.db import make_engine, upgrade
from router.core.models import ESCROW, REVENUE, AccountPart, JobRow
from router.core.request import Submission
from tests.router.conftest import T0, TWIN_MODEL, Herder

DEPOSIT = 100_000


def _postgres_only(herder: Herder) -> None:
    if herder.sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("SQLite serializes every writer by design (BEGIN IMMEDIATE)")


def _impatient(session: Session) -> Session:
    # A wait on the open transaction fails this one (LockNotAvailable) rather than passing unseen.
    session.execute(text("SET LOCAL lock_timeout = '5s'"))
    return session


def _admit(herder: Herder, session: Session, api_key: str, model: str = "smollm2") -> JobRow:
    sub = Submission(prompt="Say hello.", max_tokens=8, model=model)
    row, _ = admission.admit(session, herder.settings, admission.price(herder.settings, herder.counter, sub),
                             api_key, sub, T0)
    return row


def test_two_requesters_admit_settle_and_cancel_without_waiting_on_each_other(herder: Herder) -> None:
    _postgres_only(herder)
    alice, bob = herder.account("alice", DEPOSIT), herder.account("bob", DEPOSIT)
    alices = herder.submit(alice)
    bobs = herder.submit(bob)
    assert herder.claim(slots=2) == [alices.id, bobs.id]
    doc = herder.result(bobs.id, "Hello there.")

    with herder.sessions.begin() as first:
        # Alice: a new job held into escrow, and her running job's hold given back, both uncommitted.
        _admit(herder, first, alice)
        failed = settlement.fail_attempt(first, herder.settings, herder.job(alices.id).task_id, "Boom", "",
                                         retryable=False, now=T0)
        assert failed is not None
        with herder.sessions.begin() as second:
            _impatient(second)
            _admit(herder, second, bob)
            settled = settlement.settle(second, herder.settings, herder.counter, herder.keys, doc, T0)
            assert settled is not None and settled.charged

    herder.assert_books()


def test_claims_of_one_model_for_two_requesters_do_not_wait_on_each_other(herder: Herder) -> None:
    _postgres_only(herder)
    alice, bob = herder.account("alice", DEPOSIT), herder.account("bob", DEPOSIT)
    alices = herder.submit(alice)
    with herder.sessions.begin() as first:
        # Alice's job, claimed into one of the model's two slots, uncommitted.
        assert [row.id for row in queue.claim(first, herder.settings, "smollm2", 2, T0)] == [alices.id]
        with herder.sessions.begin() as second:
            _impatient(second)
            # Bob's job is admitted and claimed into the other slot.
            bobs = _admit(herder, second, bob)
            assert [row.id for row in queue.claim(second, herder.settings, "smollm2", 2, T0)] == [bobs.id]
    # Both slots are taken: a third job waits.
    herder.submit(bob, now=T0 + 1)
    assert herder.claim(slots=2) == []
    herder.assert_books()


def test_claims_of_two_models_do_not_wait_on_each_other(herder: Herder) -> None:
    _postgres_only(herder)
    alice, bob = herder.account("alice", DEPOSIT), herder.account("bob", DEPOSIT)
    alices = herder.submit(alice)
    bobs = herder.submit(bob, model=TWIN_MODEL)
    with herder.sessions.begin() as first:
        assert [row.id for row in queue.claim(first, herder.settings, "smollm2", 4, T0)] == [alices.id]
        with herder.sessions.begin() as second:
            _impatient(second)
            assert [row.id for row in queue.claim(second, herder.settings, TWIN_MODEL, 4, T0)] == [bobs.id]
    herder.assert_books()


def test_escrow_and_revenue_are_the_sums_of_their_parts(herder: Herder) -> None:
    alice = herder.account("alice", DEPOSIT)
    jobs = [herder.submit(alice, now=T0 + i) for i in range(3)]
    assert herder.claim(slots=3) == [job.id for job in jobs]
    for job in jobs[:2]:
        herder.settle(herder.result(job.id, "Hello there."), T0)

    charged = sum(herder.job(job.id).charged or 0 for job in jobs[:2])
    with herder.sessions() as session:
        parts = {(account, part): amount for account, part, amount in session.execute(
            select(AccountPart.account_id, AccountPart.part, AccountPart.balance))}
        escrow, revenue = ledger.account_by_name(session, ESCROW), ledger.account_by_name(session, REVENUE)
        # Only the open job keeps a part of escrow, and it is its whole offer.
        assert {part: amount for (account, part), amount in parts.items() if account == escrow.id} == {
            jobs[2].id: jobs[2].offered}
        assert ledger.balance(session, escrow) == jobs[2].offered
        assert ledger.balance(session, revenue) == charged == sum(
            amount for (account, _), amount in parts.items() if account == revenue.id)
    herder.assert_books()


def test_check_reports_a_part_of_escrow_no_hold_explains(herder: Herder) -> None:
    alice = herder.account("alice", DEPOSIT)
    job = herder.submit(alice)
    with herder.sessions.begin() as session:
        escrow = ledger.account_by_name(session, ESCROW).id
        # Money moved from one job's part to a part of its own, outside any transfer.
        session.execute(text("UPDATE account_parts SET balance = balance - 3 WHERE part = :job"), {"job": job.id})
        session.execute(text("INSERT INTO account_parts (account_id, part, balance) VALUES (:e, 'stray', 3)"),
                        {"e": escrow})
    with herder.sessions() as session:
        found = ledger.check(session)
    assert any(job.id in p and f"is {job.offered - 3}" in p for p in found), found
    assert any("'stray'" in p for p in found), found


def test_the_upgrade_moves_each_open_hold_out_of_escrows_column_into_its_part(ledger_url: str) -> None:
    upgrade(ledger_url, "0011")
    engine = make_engine(ledger_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO accounts (name, kind, api_key_hash, webhook_secret, balance) "
                "VALUES ('amy', 'user', 'hash', 'secret', 85)"))
            ids = dict(connection.execute(text("SELECT name, id FROM accounts")).tuples().all())
            for kind, debit, credit, amount, job in [
                ("deposit", "world", "amy", 100, None), ("hold", "amy", "escrow", 30, "job-1"),
                ("hold", "amy", "escrow", 10, "job-2"), ("capture", "escrow", "revenue", 5, "job-1"),
                ("release", "escrow", "amy", 25, "job-1"),
            ]:
                connection.execute(text(
                    "INSERT INTO transfers (debit_account_id, credit_account_id, amount, kind, job_id) "
                    "VALUES (:d, :c, :a, :k, :j)"), {"d": ids[debit], "c": ids[credit], "a": amount, "k": kind,
                                                     "j": job})
            for name, value in [("world", -100), ("escrow", 10), ("revenue", 5)]:
                connection.execute(text("UPDATE accounts SET balance = :b WHERE name = :n"), {"b": value, "n": name})
        upgrade(ledger_url)
        with Session(engine) as session:
            assert ledger.check(session) == []
            assert (ledger.held_for(session, "job-1"), ledger.held_for(session, "job-2")) == (0, 10)
            escrow = ledger.account_by_name(session, ESCROW)
            assert (escrow.own_balance, escrow.balance) == (0, 10)
            assert ledger.account_by_name(session, REVENUE).balance == 5
    finally:
        engine.dispose()
