"""The fee market's queue: how waiting jobs are ordered, where one stands, and how the best are claimed.

Jobs of a model leave the queue by ``priority`` (highest first), then in
arrival order (``seq``). ``priority`` is the bid plus aging, stored once per
job because it is time-invariant (see ``priority``); an index on
``(model, state, priority, seq)`` serves every query here.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, text
from sqlalchemy.orm import Session

from router.core import fees
from router.core.models import QUEUED, RUNNING, AccountLimits, JobRow
from router.core.settings import HerderSettings

#: First key of the PostgreSQL advisory lock a claim holds on its model (the second: the model's hashtext).
MODEL_LOCK_NS = 0x636C6D64  # "clmd"
#: First key of the PostgreSQL advisory lock a claim holds on an account whose jobs it may start.
ACCOUNT_LOCK_NS = 0x636C6163  # "clac"
#: The order queued jobs leave in: best priority first, first come first served among equals.
ORDER: tuple[Any, ...] = (JobRow.priority.desc(), JobRow.seq)


def priority(bid_ppm: int, created_at: float, aging_per_s: float) -> float:
    """Ordering key, higher first: the bid, plus aging that favours earlier arrivals.

    ``bid + aging × (t − created_at)`` ranks jobs the same at every ``t``, so
    the time-invariant part ``bid − aging × created_at`` can be stored once.
    """
    return bid_ppm / fees.PPM - aging_per_s * created_at


def _before(row: JobRow) -> ColumnElement[bool]:
    """Queued jobs that leave before ``row`` (same model)."""
    return and_(
        JobRow.model == row.model,
        JobRow.state == QUEUED,
        or_(JobRow.priority > row.priority, and_(JobRow.priority == row.priority, JobRow.seq < row.seq)),
    )


def position(session: Session, row: JobRow) -> int:
    """1 + the queued jobs of the same model that go before this one."""
    return (session.scalar(select(func.count()).select_from(JobRow).where(_before(row))) or 0) + 1


def at_least(session: Session, key: float) -> int:
    """Queued jobs (any model) whose priority is ``key`` or better: what a new job with ``key`` waits behind."""
    return session.scalar(
        select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED, JobRow.priority >= key)
    ) or 0


def queued_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED)) or 0


def running_count(session: Session, model: str) -> int:
    """Jobs of ``model`` running now."""
    return session.scalar(
        select(func.count()).select_from(JobRow).where(JobRow.model == model, JobRow.state == RUNNING)
    ) or 0


def running_sequences(session: Session, model: str) -> int:
    """Sequences of ``model`` running now: a job of ``n`` choices holds ``n`` of the herd's slots."""
    return session.scalar(
        select(func.coalesce(func.sum(JobRow.n), 0)).where(JobRow.model == model, JobRow.state == RUNNING)
    ) or 0


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _startable(session: Session, model: str, now: float, passed: set[int], slots: int,
               count: int | None) -> list[tuple[JobRow, int | None]]:
    """The best queued jobs of ``model`` that may start now, leaving out accounts in ``passed``, each with
    its account's own in-flight cap; on PostgreSQL locked, skipping rows another transaction holds.

    ``count`` None: as many as the model's slots look free, counted without a lock (a guess the
    claim checks once it holds the model).
    """
    if count is None:
        running = select(func.coalesce(func.sum(JobRow.n), 0)).where(
            JobRow.model == model, JobRow.state == RUNNING).scalar_subquery()
        limit: Any = func.max(0, slots - running) if not _postgres(session) else func.greatest(0, slots - running)
    else:
        limit = count
    query = (
        select(JobRow, AccountLimits.max_in_flight)
        .outerjoin(AccountLimits, AccountLimits.account_id == JobRow.account_id)
        .where(
            JobRow.model == model,
            JobRow.state == QUEUED,
            # Past its deadline a job is the tick's to expire and refund, not to run.
            or_(JobRow.deadline_at.is_(None), JobRow.deadline_at >= now),
        )
        .order_by(*ORDER)
        .limit(limit)
    )
    if passed:
        query = query.where(JobRow.account_id.not_in(sorted(passed)))
    if _postgres(session):
        query = query.with_for_update(of=JobRow, skip_locked=True)
    return [(row, cap) for row, cap in session.execute(query).tuples()]


def _hold(session: Session, model: str | None, accounts: list[int]) -> set[int]:
    """PostgreSQL: take the model's claim lock (waiting; None: already held) and every account's
    that no other claim holds (never waiting); returns the accounts held. SQLite: all of them
    (``BEGIN IMMEDIATE`` already made this transaction the only writer)."""
    if not _postgres(session) or (model is None and not accounts):
        return set(accounts)
    model_lock = "pg_advisory_xact_lock(:model_ns, hashtext(:model))" if model is not None else "true"
    held = session.execute(
        text(f"SELECT {model_lock}, ARRAY(SELECT a FROM unnest(CAST(:accounts AS integer[])) AS a "
             "WHERE pg_try_advisory_xact_lock(:account_ns, a) ORDER BY a)"),
        {"model_ns": MODEL_LOCK_NS, "model": model, "accounts": accounts, "account_ns": ACCOUNT_LOCK_NS},
    ).one()[1]
    return set(held)


def _running(session: Session, model: str, accounts: set[int]) -> tuple[int, dict[int, int]]:
    """Sequences of ``model`` running now, and the slots each of ``accounts`` holds over every model."""
    on_model = func.sum(case((JobRow.model == model, JobRow.n), else_=0))
    rows = session.execute(
        select(JobRow.account_id, func.sum(JobRow.n), on_model)
        .where(JobRow.state == RUNNING, or_(JobRow.model == model, JobRow.account_id.in_(sorted(accounts))))
        .group_by(JobRow.account_id)
    ).all()
    per_account = {account: int(n or 0) for account, n, _ in rows if account in accounts}
    return sum(int(m or 0) for _, _, m in rows), per_account


def claim(session: Session, settings: HerderSettings, model: str, slots: int, now: float) -> list[JobRow]:
    """Mark the best queued jobs of ``model`` as running, up to its free slots.

    Slots are sequences: a job of ``n`` choices takes ``n`` of them (all the
    herd's, at most), as it does in a worker's engine, so no worker is sent
    more than it can decode at once. Jobs start in the fee market's order; one
    that does not fit the slots left waits for them, and so do the jobs after
    it (a best bid is never overtaken by smaller jobs).

    An account's jobs in flight hold at most its limit of slots
    (``limits.in_flight``, over every model; admission refuses a job of more
    choices than that): an account at its limit is passed over, its jobs
    wait, and the slots go to the next best jobs of other accounts.

    On PostgreSQL nothing is locked for every claim: the candidate rows are
    taken ``FOR UPDATE SKIP LOCKED``; the claims of one model then wait on
    that model's lock only to count its free slots and mark their rows (claims
    of other models never wait on it); and an account's slots are counted
    under that account's lock, taken only if no other claim holds it (a
    claim for another model that holds it passes its jobs over, until the
    next claim). What the order guarantees is in ``docs/scaling.md``.
    """
    claimed: list[JobRow] = []
    passed: set[int] = set()  # accounts this claim starts nothing more for
    running: dict[int, int] = {}  # slots held by the accounts this claim holds
    caps: dict[int, int] = {}
    free: int | None = None  # not counted until the model is held
    while free is None or free > 0:
        # First look (before the model's lock): as many as seem free; then as many as are.
        asked = free
        rows = _startable(session, model, now, passed, slots, asked)
        fresh = sorted({row.account_id for row, _ in rows} - running.keys() - passed)
        if free is None or fresh:
            held = _hold(session, model if free is None else None, fresh)
            passed |= set(fresh) - held
            on_model, counted = _running(session, model, held)
            if free is None:
                free = slots - on_model
            running.update({account: counted.get(account, 0) for account in held})
        caps.update({row.account_id: settings.account_max_in_flight if cap is None else cap for row, cap in rows})
        for row, _ in rows:
            if free <= 0:
                break
            if row.account_id in passed:  # held by another claim, or it filled up earlier in this batch
                continue
            need = min(row.n, slots)
            if need > free:
                return claimed  # the best job left waits for its slots, and everything behind it too
            cap = caps[row.account_id]
            # Admission refuses more choices than the limit; a limit lowered since may leave one alone to run.
            if running[row.account_id] and running[row.account_id] + need > cap:
                passed.add(row.account_id)  # this job would take the account past its share: it waits
                continue
            _start(row, settings, now)
            claimed.append(row)
            free -= need
            running[row.account_id] += need
            if running[row.account_id] >= cap:
                passed.add(row.account_id)
        if free <= 0 or (asked is not None and len(rows) < asked):
            break  # no more candidates (a first look, made before the lock, is always made again)
        session.flush()  # the jobs just started are no longer queued for the next look
    return claimed


def _start(row: JobRow, settings: HerderSettings, now: float) -> None:
    """Begin a new attempt of ``row``: a fresh task id and lease."""
    row.state = RUNNING
    row.attempt += 1
    row.task_id = uuid.uuid4().hex
    row.dispatched_at = now
    row.lease_until = now + settings.lease_s
    row.worker = None
