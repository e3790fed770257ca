"""What requesters see of their jobs: one job's public state, their recent jobs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from router.core import fees, ledger, settlement
from router.core.errors import UnknownJob
from router.core.models import FINAL_STATES, QUEUED, JobRow

#: The most jobs one listing returns.
MAX_LISTED = 500


def owned(session: Session, api_key: str, job_id: str) -> JobRow:
    """The job if the key's account owns it; ``UnknownJob`` otherwise (whether or not it exists)."""
    account = ledger.account_by_key(session, api_key)
    row = session.scalar(select(JobRow).where(JobRow.id == job_id))
    if row is None or row.account_id != account.id:
        raise UnknownJob(job_id)
    return row


def position(session: Session, row: JobRow) -> int:
    """1 + the queued jobs of the same model that go before this one."""
    ahead = session.scalar(
        select(func.count()).select_from(JobRow).where(
            JobRow.model == row.model,
            JobRow.state == QUEUED,
            or_(JobRow.priority > row.priority,
                and_(JobRow.priority == row.priority, JobRow.seq < row.seq)),
        )
    ) or 0
    return ahead + 1


def describe(session: Session, job_id: str) -> dict[str, Any]:
    """A job's public state: position while queued, the response once final."""
    row = session.scalar(select(JobRow).where(JobRow.id == job_id))
    if row is None:
        raise UnknownJob(job_id)
    return describe_row(session, row)


def describe_row(session: Session, row: JobRow) -> dict[str, Any]:
    """``describe`` of a row already loaded in ``session``."""
    doc: dict[str, Any] = {
        "job_id": row.id,
        "reference": row.reference,
        "state": row.state,
        "model": row.model,
        "prompt_tokens": row.prompt_tokens,
        "max_tokens": row.max_tokens,
        "n": row.n,
        "quote": row.quote,
        "offered": row.offered,
        "multiplier": row.bid_ppm / fees.PPM,
        "attempt": row.attempt,
        "position": position(session, row) if row.state == QUEUED else 0,
        "created_at": row.created_at,
    }
    if row.state in FINAL_STATES:
        doc["response"] = settlement.response(row)
    return doc


def recent(session: Session, api_key: str, limit: int) -> list[dict[str, Any]]:
    """The key's account's most recent jobs, newest first."""
    account = ledger.account_by_key(session, api_key)
    rows = session.scalars(
        select(JobRow).where(JobRow.account_id == account.id)
        .order_by(JobRow.seq.desc()).limit(max(1, min(limit, MAX_LISTED)))
    )
    return [
        {"job_id": r.id, "state": r.state, "model": r.model, "reference": r.reference,
         "multiplier": r.bid_ppm / fees.PPM, "offered": r.offered, "charged": r.charged,
         "refunded": r.refunded, "completion_tokens": r.completion_tokens,
         "created_at": r.created_at, "finished_at": r.finished_at}
        for r in rows
    ]
