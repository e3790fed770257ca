"""What requesters see of their jobs: one job's public state, the response every channel gets, their recent jobs."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from llama_tasks import tool_calls
from llama_tasks.result import Choice
from router.core import fees, ledger, queue
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
        "position": queue.position(session, row) if row.state == QUEUED else 0,
        "created_at": row.created_at,
    }
    if row.state in FINAL_STATES:
        doc["response"] = response(row)
    if row.text_erased_at is not None:
        doc["text_erased_at"] = row.text_erased_at
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


def completions(row: JobRow) -> list[Choice]:
    """A finished job's completions as settled (none for a job that did not complete)."""
    return [Choice(**c) for c in json.loads(row.choices)] if row.choices else []


def _read_tool_calls(row: JobRow, choices: list[dict[str, Any]]) -> None:
    """Add each choice's ``content`` and ``tool_calls`` when the job offered tools (``tool_calls.parse``).

    ``text`` stays what the model wrote (and what was counted and charged);
    ``finish_reason`` becomes ``tool_calls`` for a choice that ended with calls.
    """
    generation = json.loads(row.request) if row.request else {}
    for choice in choices:
        parser = tool_calls.parser_for(generation, row.id, choice["index"])
        if parser is not None:
            choice.update(tool_calls.parse(parser, choice["text"] or "", choice["finish_reason"]))


def response(row: JobRow) -> dict[str, Any]:
    """What every channel receives about a finished job (``text`` and ``finish_reason`` are choice 0's).

    Once the retention window has erased a job's text, its texts read ``None``
    (not an empty text it never produced), ``text_erased_at`` says when, and
    every figure is as it was.
    """
    choices = [c.to_json() for c in completions(row)]
    if row.text_erased_at is not None:
        for choice in choices:
            choice["text"], choice["logprobs"] = None, None
    else:
        _read_tool_calls(row, choices)
    first = choices[0] if choices else {"text": None, "finish_reason": None}
    erased = {} if row.text_erased_at is None else {"text_erased_at": row.text_erased_at}
    return erased | {
        "job_id": row.id,
        "reference": row.reference,
        "status": row.state,
        "model": row.model,
        "text": first["text"],
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_tokens": row.cached_tokens or 0,
        "finish_reason": first["finish_reason"],
        # Choice 0's calls, beside its text (present when the job offered tools).
        **({"tool_calls": first["tool_calls"]} if "tool_calls" in first else {}),
        "choices": choices,
        "offered": row.offered,
        "charged": row.charged,
        "refunded": row.refunded,
        "error": row.error,
        "message": row.error_message,
        "attempts": row.attempt,
        "worker": row.worker,
        "timings": json.loads(row.timings) if row.timings else {},
    }
