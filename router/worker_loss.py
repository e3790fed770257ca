"""Attempts whose worker process died, found long before their lease runs out.

A batching worker is one process running many jobs; when it is killed, Celery
has no parent left to put their messages back (Redis would, after its
visibility timeout). Each attempt's replay claim names the worker and the
process that runs it, and that process also publishes the worker's
heartbeat: a claim still ``running`` whose process no longer beats belongs
to a dead worker, and its job can go again at once.
"""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from llama_tasks import claims
from router.models import RUNNING, JobRow


def lost_task_ids(session: Session, r: redis.Redis, herd: list[dict[str, Any]]) -> list[str]:
    """Task ids of running attempts claimed by a process that no longer beats."""
    rows = session.execute(
        select(JobRow.task_id, JobRow.id, JobRow.attempt).where(JobRow.state == RUNNING).order_by(JobRow.seq)
    ).all()
    if not rows:
        return []
    alive = {(w.get("worker"), w.get("pid")) for w in herd}
    held = claims.holders(r, [(job_id, attempt) for _, job_id, attempt in rows])
    return [
        task_id
        for (task_id, _, _), claim in zip(rows, held)
        if task_id is not None
        and claim is not None  # no claim yet: the message has not reached a worker (the lease covers it)
        and claim.get("state") == claims.RUNNING
        and claim.get("message") == task_id
        and claim.get("worker")
        and (claim.get("worker"), claim.get("pid")) not in alive
    ]
