"""The fee market's queue: how waiting jobs are ordered, where one stands, and how the best are claimed.

Jobs of a model leave the queue by ``priority`` (highest first), then in
arrival order (``seq``). ``priority`` is the bid plus aging, stored once per
job because it is time-invariant (see ``priority``); an index on
``(model, state, priority, seq)`` serves every query here.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from router.core import fees, limits
from router.core.models import QUEUED, RUNNING, JobRow
from router.core.settings import HerderSettings

#: PostgreSQL advisory lock every claim holds until commit (distinct from
#: admission's queue lock, ``admission.QUEUE_LOCK_KEY``).
CLAIM_LOCK_KEY = 0x636C6C616D61  # "cllama"
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


def _serialize(session: Session) -> None:
    """Make claims one at a time on PostgreSQL (SQLite's ``BEGIN IMMEDIATE`` already does).

    One lock for every model, not one per model: an account's jobs in flight
    are counted over the whole herd, so two claims for two models must not
    both start its last allowed job.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))


def _startable(session: Session, model: str, now: float, full: set[int], count: int) -> list[JobRow]:
    """The best ``count`` queued jobs of ``model`` that may start now, leaving out accounts in ``full``."""
    query = (
        select(JobRow)
        .where(
            JobRow.model == model,
            JobRow.state == QUEUED,
            # Past its deadline a job is the tick's to expire and refund, not to run.
            or_(JobRow.deadline_at.is_(None), JobRow.deadline_at >= now),
        )
        .order_by(*ORDER)
        .limit(count)
    )
    if full:
        query = query.where(JobRow.account_id.not_in(sorted(full)))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


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
    """
    _serialize(session)
    free = slots - running_sequences(session, model)
    if free <= 0:
        return []
    running = limits.running_by_account(session)
    caps = limits.in_flight_caps(session)
    default_cap = settings.account_max_in_flight
    full = {account for account, n in running.items() if n >= caps.get(account, default_cap)}
    claimed: list[JobRow] = []
    while free > 0:
        rows = _startable(session, model, now, full, free)
        for row in rows:
            if row.account_id in full:  # it filled up earlier in this batch
                continue
            need = min(row.n, slots)
            if need > free:
                return claimed  # the best job left waits for its slots, and everything behind it too
            held = running.get(row.account_id, 0)
            # Admission refuses more choices than the limit; a limit lowered since may leave one alone to run.
            if held and held + need > caps.get(row.account_id, default_cap):
                full.add(row.account_id)  # this job would take the account past its share: it waits
                continue
            _start(row, settings, now)
            claimed.append(row)
            free -= need
            running[row.account_id] = held + need
            if running[row.account_id] >= caps.get(row.account_id, default_cap):
                full.add(row.account_id)
            if free <= 0:
                break
        else:
            if not rows:
                break  # no more candidates
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
