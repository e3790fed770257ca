"""Admission: validate, quote, and hold the offer — or refuse with nothing held.

Everything that can refuse a request runs before the ledger is touched; the
hold and the job row are written in the caller's single transaction.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llama_tasks import engine
from llama_tasks.errors import InvalidRequest
from llama_tasks.job import (
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    Job,
    validate,
)
from router import fees, ledger
from router.errors import (
    BadChannel,
    BadDeadline,
    BadReference,
    InsufficientFee,
    QueueFull,
    ReferenceConflict,
    RequestTooLarge,
)
from router.models import QUEUED, JobRow, width
from router.settings import HerderSettings
from router.tokens import TokenCounter

#: Job fields that belong to the envelope rather than to the request.
ENVELOPE_FIELDS = ("job_id", "attempt", "expires_at", "issued_at")
GENERATION_FIELDS = tuple(f.name for f in fields(Job) if f.name not in ENVELOPE_FIELDS)


#: Longest reference, callback task or queue, and webhook URL: their columns'
#: widths, checked here because PostgreSQL would refuse them only at the INSERT.
MAX_REFERENCE_CHARS = width("reference")
MAX_CALLBACK_CHARS = width("callback_task")
MAX_WEBHOOK_CHARS = width("webhook_url")
#: PostgreSQL advisory lock that makes counting the queue and joining it one step
#: (above 2**32, so it never meets dispatch's per-model crc32 keys).
QUEUE_LOCK_KEY = 0x716C6C616D61  # "qllama"


@dataclass
class Submission:
    """One paid request as a requester sends it (client, gateway or CLI)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 128
    model: str = "smollm2"
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    seed: int | None = None
    fee: int | None = None
    multiplier: float | str | None = None
    reference: str | None = None
    callback_task: str | None = None
    callback_queue: str | None = None
    webhook_url: str | None = None
    deadline_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Submission":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}")
        return cls(**data)

    def generation(self) -> dict[str, Any]:
        d = asdict(self)
        return {name: d[name] for name in GENERATION_FIELDS}

    def fingerprint(self) -> str:
        """sha256 of everything but the reference: equal requests, equal hash."""
        d = asdict(self)
        d.pop("reference")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def as_job(job_id: str, attempt: int, generation: dict[str, Any], expires_at: float, issued_at: float) -> Job:
    return Job(job_id=job_id, attempt=attempt, expires_at=expires_at, issued_at=issued_at, **generation)


def _is_text(value: object, limit: int) -> bool:
    """Printable text of 1 to ``limit`` characters (PostgreSQL refuses NUL in text)."""
    return isinstance(value, str) and 1 <= len(value) <= limit and value.isprintable()


def _check_reference(sub: Submission) -> None:
    if sub.reference is not None and not _is_text(sub.reference, MAX_REFERENCE_CHARS):
        raise BadReference(sub.reference, MAX_REFERENCE_CHARS)


def _check_channels(sub: Submission) -> None:
    for name in ("callback_task", "callback_queue"):
        value = getattr(sub, name)
        if value is not None and not _is_text(value, MAX_CALLBACK_CHARS):
            raise BadChannel(f"{name} must be printable text of 1 to {MAX_CALLBACK_CHARS} characters")
    if sub.callback_queue and not sub.callback_task:
        raise BadChannel("callback_queue needs callback_task")
    if sub.webhook_url is not None:
        if not _is_text(sub.webhook_url, MAX_WEBHOOK_CHARS):
            raise BadChannel(f"webhook must be a URL of at most {MAX_WEBHOOK_CHARS} characters")
        url = urlparse(sub.webhook_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise BadChannel(f"webhook must be an http(s) URL, got {sub.webhook_url!r}")


def _size(sub: Submission) -> int:
    parts = [sub.prompt, sub.messages, sub.grammar, sub.json_schema, sub.stop]
    return len(json.dumps(parts, ensure_ascii=False).encode())


def queued_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED)) or 0


def _lock_queue(session: Session) -> bool:
    """Hold the queue until commit, so counting it and joining it is one step.

    Without it two PostgreSQL admissions that both count ``max_queue − 1``
    would both join. SQLite needs nothing (``BEGIN IMMEDIATE`` already
    serializes writers); returns whether a lock was taken.
    """
    if session.get_bind().dialect.name != "postgresql":
        return False
    session.execute(select(func.pg_advisory_xact_lock(QUEUE_LOCK_KEY)))
    return True


def _existing(session: Session, account_id: int, sub: Submission) -> JobRow | None:
    """The job a reused reference already names; a conflict if its parameters differ."""
    if sub.reference is None:
        return None
    existing = session.scalar(
        select(JobRow).where(JobRow.account_id == account_id, JobRow.reference == sub.reference)
    )
    if existing is not None and existing.request_hash != sub.fingerprint():
        raise ReferenceConflict(sub.reference, existing.id)
    return existing


def admit(
    session: Session,
    settings: HerderSettings,
    counter: TokenCounter,
    api_key: str,
    sub: Submission,
    now: float | None = None,
) -> tuple[JobRow, bool]:
    """Admit ``sub`` for the key's account; returns the job and whether it is new.

    Raises an ``AdmissionError``, ``InvalidRequest`` or ``InsufficientFunds``
    with nothing held. The caller commits.
    """
    now = time.time() if now is None else now
    account = ledger.account_by_key(session, api_key)
    _check_reference(sub)
    existing = _existing(session, account.id, sub)
    if existing is not None:
        return existing, False

    size = _size(sub)
    if size > settings.max_request_bytes:
        raise RequestTooLarge(size, settings.max_request_bytes)
    job_id = uuid.uuid4().hex
    job = as_job(job_id, 0, sub.generation(), 0.0, 0.0)
    validate(job, settings.max_tokens_cap)
    _check_channels(sub)
    if sub.deadline_s is not None and (
        isinstance(sub.deadline_s, bool)
        or not isinstance(sub.deadline_s, (int, float))
        or not math.isfinite(sub.deadline_s)  # NaN would never expire; SQLite stores it as NULL
        or sub.deadline_s <= 0
    ):
        raise BadDeadline(sub.deadline_s)
    prompt_tokens = counter.prompt_tokens(job)  # UnknownModelRequested for a model we lack
    engine.check_fits(prompt_tokens, sub.max_tokens, settings.n_ctx)
    quoted = fees.quote(settings.base_fee, settings.fee_per_token, prompt_tokens, sub.max_tokens)
    offered = fees.offer(quoted, sub.fee, sub.multiplier)
    if offered < quoted:
        raise InsufficientFee(quoted, offered)
    if _lock_queue(session):
        # A concurrent submit of this reference may have committed while we waited.
        existing = _existing(session, account.id, sub)
        if existing is not None:
            return existing, False
    queued = queued_count(session)
    if queued >= settings.max_queue:
        raise QueueFull(queued, settings.max_queue)

    ledger.hold(session, account, offered, job_id)  # InsufficientFunds: nothing held
    bid = fees.bid_ppm(offered, quoted)
    row = JobRow(
        id=job_id,
        account_id=account.id,
        reference=sub.reference,
        request_hash=sub.fingerprint(),
        model=sub.model,
        request=json.dumps(sub.generation()),
        prompt_tokens=prompt_tokens,
        max_tokens=sub.max_tokens,
        quote=quoted,
        base_fee=settings.base_fee,
        fee_per_token=settings.fee_per_token,
        offered=offered,
        bid_ppm=bid,
        priority=priority(bid, now, settings.aging_per_s),
        state=QUEUED,
        attempt=0,
        created_at=now,
        deadline_at=None if sub.deadline_s is None else now + sub.deadline_s,
        callback_task=sub.callback_task,
        # Celery's own default queue when the requester names none.
        callback_queue=sub.callback_queue or ("celery" if sub.callback_task else None),
        webhook_url=sub.webhook_url,
        delivered="",
    )
    session.add(row)
    session.flush()
    return row, True


def priority(bid_ppm: int, created_at: float, aging_per_s: float) -> float:
    """Ordering key, higher first: the bid, plus aging that favours earlier arrivals.

    ``bid + aging × (t − created_at)`` ranks jobs the same at every ``t``, so
    the time-invariant part ``bid − aging × created_at`` can be stored once.
    """
    return bid_ppm / fees.PPM - aging_per_s * created_at
