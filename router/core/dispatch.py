"""Dispatch: feed the best queued jobs to free slots, in signed envelopes.

The herd comes from worker heartbeats; the jobs in flight come from SQL.
Choosing and marking jobs happens in one transaction (``queue.claim``;
SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: job and slot rows ``SKIP LOCKED``,
each account's lock to count its jobs in flight), so no
job is sent twice, no model gets more jobs than it has slots, and no account
more jobs in flight than its limit (``limits.in_flight``: its other jobs wait
while other accounts' start).
Messages are sent after the commit, and each send is then recorded in Redis
(``mark_sent``): if the herder dies in between, the tick finds the attempt
neither sent nor claimed by a worker (``unsent``) and sends it again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks import claims, faults, signing
from llama_tasks.control import SERVING
from router.core import queue
from router.core.models import RUNNING, JobRow
from router.core.request import as_job
from router.core.settings import HerderSettings

#: ``SENT_PREFIX + task id`` exists once the attempt's message was sent.
SENT_PREFIX = "llamas:sent:"
#: An attempt claimed this long ago, neither recorded sent nor claimed by a
#: worker, was never sent: the send follows the claim's commit within milliseconds.
UNSENT_AFTER_S = 2.0

#: send(job, envelope): puts one envelope on its model's queue.
Sender = Callable[[JobRow, dict[str, Any]], None]
#: A claimed attempt and its signed envelope.
Order = tuple[JobRow, dict[str, Any]]


def serving(worker: dict[str, Any]) -> bool:
    """Whether a heartbeat says its worker takes work for its model now (not idle, loading or draining)."""
    return bool(worker.get("model")) and worker.get("state", SERVING) == SERVING


def capacity(herd: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Slots per model across the live workers that serve it now."""
    slots: dict[str, int] = defaultdict(int)
    for worker in herd:
        if serving(worker):
            slots[worker["model"]] += int(worker.get("slots", 0))
    return dict(slots)


def cache_key(account_id: int, key: Ed25519PrivateKey) -> str:
    """The account's prompt-cache scope as workers see it.

    Workers reuse a cached prompt only within one scope, so one account's
    prompt never shortens (or is counted in) another's. Derived from the
    herder's key, it is the same on every herder and says nothing about the
    account to anyone without that key.
    """
    return hmac.new(key.private_bytes_raw(), f"prompt-cache:{account_id}".encode(), hashlib.sha256).hexdigest()[:32]


def envelope(row: JobRow, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed work order of a row's current attempt; it expires with the lease."""
    assert row.lease_until is not None and row.dispatched_at is not None
    job = as_job(row.id, row.attempt, json.loads(row.request), row.lease_until, row.dispatched_at)
    job.cache_key = cache_key(row.account_id, key)
    # Only the worker that receives this envelope learns it: its result proves receipt with it.
    job.attempt_secret = signing.attempt_secret(key, row.id, row.attempt)
    return signing.sign(job.to_payload(), key)


def orders(rows: list[JobRow], key: Ed25519PrivateKey) -> list[Order]:
    """The claimed rows with their signed envelopes, to send once the claim has committed."""
    return [(row, envelope(row, key)) for row in rows]


def dispatch(
    sessions: sessionmaker[Session],
    settings: HerderSettings,
    herd: list[dict[str, Any]],
    key: Ed25519PrivateKey,
    send: Sender,
    now: float,
) -> int:
    """Send as many jobs as the herd has free slots for; returns how many were sent."""
    sent = 0
    for model, slots in capacity(herd).items():
        with sessions.begin() as session:
            claimed = orders(queue.claim(session, settings, model, slots, now), key)
        if claimed:
            faults.point("claimed")
        for row, env in claimed:
            send(row, env)
            sent += 1
    return sent


def mark_sent(r: redis.Redis, row: JobRow, lease_s: float) -> None:
    """Record that the row's current attempt was sent (for as long as its lease runs)."""
    r.set(SENT_PREFIX + str(row.task_id), 1, ex=max(1, math.ceil(lease_s)))


def unsent(session: Session, r: redis.Redis, now: float) -> list[JobRow]:
    """Running attempts claimed a while ago whose message no herder recorded sending
    and no worker claimed: their herder died between the claim's commit and the send."""
    running = session.execute(
        select(JobRow.seq, JobRow.id, JobRow.attempt, JobRow.task_id)
        .where(JobRow.state == RUNNING, JobRow.dispatched_at < now - UNSENT_AFTER_S)
        .order_by(JobRow.seq)
    ).all()
    if not running:
        return []
    sent = r.mget([SENT_PREFIX + str(task_id) for _, _, _, task_id in running])
    held = claims.holders(r, [(job_id, attempt) for _, job_id, attempt, _ in running])
    lost = [seq for (seq, *_), mark, claim in zip(running, sent, held, strict=True) if mark is None and claim is None]
    if not lost:
        return []
    return list(session.scalars(select(JobRow).where(JobRow.seq.in_(lost), JobRow.state == RUNNING)))
