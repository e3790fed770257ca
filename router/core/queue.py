"""The fee market's queue: how waiting jobs are ordered, where one stands, and how the best are claimed.

Jobs of a model leave the queue by ``priority`` (highest first), then in
arrival order (``seq``). ``priority`` is the bid plus aging, stored once per
job because it is time-invariant (see ``priority``); an index on
``(model, state, priority, seq)`` serves every query here.
"""

from __future__ import annotations

import uuid
import zlib
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from router.core import fees
from router.core.models import QUEUED, RUNNING, JobRow
from router.core.settings import HerderSettings

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
    return session.scalar(
        select(func.count()).select_from(JobRow).where(JobRow.model == model, JobRow.state == RUNNING)
    ) or 0


def _serialize(session: Session, model: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(zlib.crc32(model.encode()))))


def claim(session: Session, settings: HerderSettings, model: str, slots: int, now: float) -> list[JobRow]:
    """Mark the best queued jobs of ``model`` as running, up to its free slots."""
    _serialize(session, model)
    free = slots - running_count(session, model)
    if free <= 0:
        return []
    query = (
        select(JobRow)
        .where(
            JobRow.model == model,
            JobRow.state == QUEUED,
            # Past its deadline a job is the tick's to expire and refund, not to run.
            or_(JobRow.deadline_at.is_(None), JobRow.deadline_at >= now),
        )
        .order_by(*ORDER)
        .limit(free)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = list(session.scalars(query))
    for row in rows:
        row.state = RUNNING
        row.attempt += 1
        row.task_id = uuid.uuid4().hex
        row.dispatched_at = now
        row.lease_until = now + settings.lease_s
        row.worker = None
    return rows
