"""Erasing a finished job's text once its delivery is over and its retention has passed.

A job keeps its request's text (prompt or messages, stop strings, grammar or
JSON schema, an embedding job's inputs) and its completions' text and logprobs
(an embedding job's vectors) only while delivery needs
them (``HerderSettings.webhook_delivery_s`` after it finished: the longest a
webhook can take, every try at its deadline with every pause between) plus
``LLAMAS_TEXT_RETENTION_S``. Then a periodic herder task (``router.erase_text``)
erases them from the ledger and the copies in Redis: the response waiting
for handles, the token stream and the stored result of the settled attempt.

What receipts, ``llamas ledger check`` and audits need stays: tokens, money,
prices, timings, finish reasons, the worker and operator, the model id and
the request's hash. A queued or running job is never erased. Reading an
erased job answers its state and figures, with ``text_erased_at`` saying when
its text went (``annotate``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks import stream
from router.core.keys import NOTIFY_PREFIX, RESPONSE_PREFIX
from router.core.models import FINAL_STATES, JobRow

#: Fields of a stored request that hold the requester's text; the rest are figures and flags.
REQUEST_TEXT_FIELDS = ("prompt", "messages", "stop", "grammar", "json_schema", "tools", "tool_choice", "input")
#: Jobs erased per transaction: each is one short write, so SQLite's single writer is never held long.
BATCH = 200
#: Most batches one run erases; a backlog (a first run on an old ledger) is worked off over several runs.
MAX_BATCHES = 50
#: How often the herder's beat sends ``router.erase_text``, in seconds.
ERASE_EVERY_S = 60.0


@dataclass(frozen=True)
class Erased:
    """A job whose text was erased from the ledger: what its Redis copies are named by."""

    job_id: str
    task_id: str | None


def erase_request(request_json: str) -> str:
    """The stored request without its text fields (sampling, counts and flags stay)."""
    try:
        request = json.loads(request_json)
    except ValueError:
        return "{}"
    if not isinstance(request, dict):
        return "{}"
    return json.dumps({k: v for k, v in request.items() if k not in REQUEST_TEXT_FIELDS}, sort_keys=True)


def erase_choices(choices_json: str | None) -> str | None:
    """The stored choices with empty text and no logprobs (index, finish reason and tokens stay)."""
    if choices_json is None:
        return None
    try:
        choices = json.loads(choices_json)
    except ValueError:
        return "[]"
    if not isinstance(choices, list):
        return "[]"
    # An embedding's vector is as much the requester's text as the text is: it can be inverted.
    return json.dumps([c | {"text": "", "logprobs": None} | ({"embedding": None} if "embedding" in c else {})
                       for c in choices if isinstance(c, dict)])


def erase_row(row: JobRow, now: float) -> Erased:
    """Erase one final job's text in the caller's transaction."""
    assert row.state in FINAL_STATES, f"job {row.id} is {row.state}: an open job's text is still needed"
    row.request = erase_request(row.request)
    row.choices = erase_choices(row.choices)
    row.text_erased_at = now
    return Erased(row.id, row.task_id)


def erase_due(session: Session, kept_s: float, now: float, limit: int = BATCH) -> list[Erased]:
    """Erase the text of up to ``limit`` final jobs that finished more than ``kept_s`` seconds ago.

    A job whose response is still owed (``router.core.forwarding``: Redis
    was away when it ended, say) keeps its text until it has been delivered.
    """
    rows = session.scalars(
        select(JobRow)
        .where(JobRow.text_erased_at.is_(None), JobRow.finished_at <= now - kept_s,
               JobRow.state.in_(FINAL_STATES), JobRow.delivery_due.is_(False))
        .order_by(JobRow.finished_at)
        .limit(limit)
        # PostgreSQL: two herders erasing at once take different rows (SQLite's writer is one anyway).
        .with_for_update(skip_locked=True)
    ).all()
    return [erase_row(row, now) for row in rows]


def forget_in_redis(r: redis.Redis, erased: Iterable[Erased], result_key: Callable[[str], str]) -> None:
    """Delete the Redis copies of erased jobs' text: response, wake-up list, token stream, stored result.

    ``result_key`` names a task's entry in the result store (Celery's backend knows its scheme).
    """
    keys: list[str] = []
    for job in erased:
        keys += [RESPONSE_PREFIX + job.job_id, NOTIFY_PREFIX + job.job_id, stream.key(job.job_id)]
        if job.task_id:
            keys.append(result_key(job.task_id))
    if keys:
        r.delete(*keys)


def run(sessions: sessionmaker[Session], r: redis.Redis, kept_s: float, now: float,
        result_key: Callable[[str], str], batches: int = MAX_BATCHES) -> int:
    """Erase every job that is due, batch by batch; returns how many were erased.

    Each batch commits before its Redis copies are deleted, so a crash in
    between leaves copies that expire on their own TTLs, never a job whose
    ledger text is gone while the run believes otherwise.
    """
    total = 0
    for _ in range(batches):
        with sessions.begin() as session:
            erased = erase_due(session, kept_s, now)
        forget_in_redis(r, erased, result_key)
        total += len(erased)
        if len(erased) < BATCH:
            break
    return total
