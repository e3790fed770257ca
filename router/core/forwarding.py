"""Forwarding: deliver each finished job's response to every channel it named.

Channels are the waiting Python handle (a Redis key plus a wake-up list),
a Celery task on the requester's own queue, and a signed webhook.

Delivery is at least once, with an effect of exactly once. The transaction
that ends a job also marks it ``delivery_due``; its response is then durable
in the ledger. The process that ended it delivers after the commit and only
then marks the channels delivered (``mark``): a process that dies in between
leaves the job due, and the tick delivers it again (``due``). Every delivery
names the job id, so a receiver drops a second one: the handle is one Redis
key written again with the same response, a webhook carries the job id as
``X-Llamas-Delivery``, and a callback's response carries ``job_id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import bindparam, select, update
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


@dataclass(frozen=True)
class Delivery:
    """A final response and the channels it goes to."""

    job_id: str
    response: dict[str, Any]
    channels: list[str]
    callback: tuple[str | None, str | None]
    times: tuple[float, float | None, float | None]


#: A job still due this long after it ended is delivered again by the tick: the
#: process that ended it should have delivered and marked it long before.
REDELIVER_AFTER_S = 5.0
#: Due jobs one tick delivers again at most (the rest wait for the next tick).
REDELIVER_BATCH = 100


#: Built once; run on the connection, as no caller holds the job's row in its session.
_MARK = (update(JobRow).where(JobRow.id == bindparam("p_job_id"), JobRow.delivery_due.is_(True))
         .values(delivered=bindparam("p_delivered"), delivery_due=False))


def mark(session: Session, d: Delivery) -> bool:
    """Record that ``d`` was delivered; False if another process had recorded it first."""
    result = session.connection().execute(_MARK, {"p_job_id": d.job_id,
                                                  "p_delivered": "".join(c + "," for c in d.channels)})
    return bool(result.rowcount)


def due(session: Session, now: float) -> list[Delivery]:
    """Jobs that ended a while ago and are still not delivered: their deliverer died, say."""
    rows = session.scalars(
        select(JobRow)
        .where(JobRow.delivery_due.is_(True), JobRow.finished_at < now - REDELIVER_AFTER_S)
        .order_by(JobRow.finished_at)
        .limit(REDELIVER_BATCH)
    )
    return [pending(row) for row in rows]


def to_handle(r: redis.Redis, response: dict[str, Any], ttl_s: int) -> None:
    job_id = response["job_id"]
    pipe = r.pipeline()
    pipe.set(RESPONSE_PREFIX + job_id, json.dumps(response), ex=ttl_s)
    pipe.rpush(NOTIFY_PREFIX + job_id, "1")
    pipe.expire(NOTIFY_PREFIX + job_id, ttl_s)
    pipe.execute()


def pending(row: JobRow) -> Delivery:
    """The delivery a job that just ended owes, marked due in the caller's transaction."""
    row.delivery_due = True
    return Delivery(row.id, views.response(row), channels(row), (row.callback_task, row.callback_queue),
                    (row.created_at, row.dispatched_at, row.finished_at))


def deliver(forwarder: Forwarder, d: Delivery) -> None:
    """Send a delivery to its channels (after the transaction that made it due has committed)."""
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
