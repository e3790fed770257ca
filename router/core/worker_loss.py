"""Attempts whose worker process died, found long before their lease runs out.

A batching worker is one process running many jobs; when it is killed, Celery
has no parent left to put their messages back (Redis would, after its
visibility timeout). Each attempt's replay claim names the worker and the
process that runs it, and that process also publishes the worker's
heartbeat: a claim still ``running`` whose process no longer beats belongs
to a dead worker, and its job can go again at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from llama_tasks import claims
from router.core.models import RUNNING, JobRow


@dataclass(frozen=True)
class LostAttempt:
    task_id: str
    job_id: str
    attempt: int


def lost_attempts(session: Session, r: redis.Redis, herd: list[dict[str, Any]]) -> list[LostAttempt]:
    """Running attempts claimed by a process that no longer beats."""
    rows = session.execute(
        select(JobRow.task_id, JobRow.id, JobRow.attempt).where(JobRow.state == RUNNING).order_by(JobRow.seq)
    ).all()
    if not rows:
        return []
    alive = {(w.get("worker"), w.get("pid")) for w in herd}
    held = claims.holders(r, [(job_id, attempt) for _, job_id, attempt in rows])
    return [
        LostAttempt(task_id, job_id, attempt)
        for (task_id, job_id, attempt), claim in zip(rows, held)
        if task_id is not None
        and claim is not None  # no claim yet: the message has not reached a worker (the lease covers it)
        and claim.get("state") == claims.RUNNING
        and claim.get("message") == task_id
        and claim.get("worker")
        and (claim.get("worker"), claim.get("pid")) not in alive
    ]


def close_claim(r: redis.Redis, lost: LostAttempt) -> None:
    """Mark a lost attempt's claim finished: when Redis hands its unacknowledged
    message back (after the visibility timeout), a worker refuses it as a
    replay instead of generating a job that has already gone again."""
    claims.finish(r, lost.job_id, lost.attempt, lost.task_id)
