"""Forwarding: deliver each finished job's response to every channel it named.

Channels are the waiting Python handle (a Redis key plus a wake-up list),
a Celery task on the requester's own queue, and a signed webhook. A channel
is marked delivered in SQL *before* it is used, by a conditional update that
only one process can win, so no channel ever receives a response twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from router.core import views
from router.core.errors import UnknownJob
from router.core.keys import NOTIFY_PREFIX, RESPONSE_PREFIX
from router.core.models import Account, JobRow
from router.core.parts import Forwarder

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


@dataclass(frozen=True)
class Delivery:
    """A final response and the channels this process won the right to deliver it to."""

    job_id: str
    response: dict[str, Any]
    channels: list[str]
    callback: tuple[str | None, str | None]
    times: tuple[float, float | None, float | None]


def claim(session: Session, row: JobRow) -> Delivery:
    """Claim the job's undelivered channels in the caller's transaction."""
    todo = [c for c in channels(row) if take(session, row.id, c)]
    return Delivery(row.id, views.response(row), todo, (row.callback_task, row.callback_queue),
                    (row.created_at, row.dispatched_at, row.finished_at))


def deliver(forwarder: Forwarder, d: Delivery) -> None:
    """Send a claimed delivery to its channels (after the claim has committed)."""
    if HANDLE in d.channels:
        forwarder.to_handle(d.response, d.times)
    task, queue = d.callback
    if CALLBACK in d.channels and task:
        forwarder.to_callback(task, queue or "celery", d.response)
    if WEBHOOK in d.channels:
        forwarder.to_webhook(d.job_id)


def webhook_target(session: Session, job_id: str) -> tuple[str, str, dict[str, Any]]:
    """URL, secret and response of a job's webhook delivery."""
    row = session.scalar(select(JobRow).where(JobRow.id == job_id))
    if row is None or not row.webhook_url:
        raise UnknownJob(job_id)
    account = session.get(Account, row.account_id)
    assert account is not None
    # Opened from its seal (``router.core.sealing``) only here, to sign.
    return row.webhook_url, account.webhook_secret, views.response(row)
