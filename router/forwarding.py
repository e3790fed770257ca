"""Forwarding: deliver each finished job's response to every channel it named.

Channels are the waiting Python handle (a Redis key plus a wake-up list),
a Celery task on the requester's own queue, and a signed webhook. A channel
is marked delivered in SQL *before* it is used, by a conditional update that
only one process can win, so no channel ever receives a response twice.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from sqlalchemy import update
from sqlalchemy.orm import Session

from router.keys import NOTIFY_PREFIX, RESPONSE_PREFIX
from router.models import JobRow

HANDLE, CALLBACK, WEBHOOK = "handle", "callback", "webhook"


def channels(row: JobRow) -> list[str]:
    """The channels a job's response goes to; the handle always gets it."""
    named = [HANDLE]
    if row.callback_task:
        named.append(CALLBACK)
    if row.webhook_url:
        named.append(WEBHOOK)
    return named


def take(session: Session, job_id: str, channel: str) -> bool:
    """Claim the delivery of ``channel`` for a job; False if it was already claimed."""
    result = session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, ~JobRow.delivered.contains(channel))
        .values(delivered=JobRow.delivered + channel + ",")
    )
    return bool(getattr(result, "rowcount", 0))


def to_handle(r: redis.Redis, response: dict[str, Any], ttl_s: int) -> None:
    job_id = response["job_id"]
    pipe = r.pipeline()
    pipe.set(RESPONSE_PREFIX + job_id, json.dumps(response), ex=ttl_s)
    pipe.rpush(NOTIFY_PREFIX + job_id, "1")
    pipe.expire(NOTIFY_PREFIX + job_id, ttl_s)
    pipe.execute()


