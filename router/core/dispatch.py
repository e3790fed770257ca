"""Dispatch: feed the best queued jobs to free slots, in signed envelopes.

The herd comes from worker heartbeats; the jobs in flight come from SQL.
Choosing and marking jobs happens in one transaction that concurrent
dispatchers serialize on (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: one
advisory lock plus ``SKIP LOCKED``), so no job is sent twice, no model gets
more jobs than it has slots, and no account more jobs in flight than its
limit (``limits.in_flight``: its other jobs wait while other accounts' start).
Messages are sent after the commit:
if the herder dies in between, the job's lease runs out and it goes again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks import signing
from router.core import queue
from router.core.models import JobRow
from router.core.request import as_job
from router.core.settings import HerderSettings

#: send(job, envelope): puts one envelope on its model's queue.
Sender = Callable[[JobRow, dict[str, Any]], None]
#: A claimed attempt and its signed envelope.
Order = tuple[JobRow, dict[str, Any]]


def capacity(herd: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Slots per model across the live workers."""
    slots: dict[str, int] = defaultdict(int)
    for worker in herd:
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
        for row, env in claimed:
            send(row, env)
            sent += 1
    return sent
