"""Admission: validate, quote, and hold the offer — or refuse with nothing held.

Everything that can refuse a request runs before the ledger is touched; the
hold and the job row are written in the caller's single transaction.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, inspect, select
from sqlalchemy.orm import Session, make_transient_to_detached

from llama_tasks import embedding_job
from llama_tasks.job import MAX_SEED, Job, check_fits
from router.core import fees, ledger, limits, queue, request, webhooks
from router.core.errors import (
    InsufficientFee,
    NoWorkers,
    QueueFull,
    ReferenceConflict,
    RequestTooLarge,
    UnsupportedParameter,
)
from router.core.models import QUEUED, JobRow
from router.core.parts import TokenCounting
from router.core.request import Submission, as_job
from router.core.settings import HerderSettings

#: PostgreSQL advisory lock that makes counting the queue and joining it one step once the queue is
#: within ``QUEUE_LOCK_HEADROOM`` of ``max_queue`` (further from full, admissions take no common lock).
QUEUE_LOCK_KEY = 0x716C6C616D61  # "qllama"
#: Queued jobs short of ``max_queue`` from which admissions count the queue under ``QUEUE_LOCK_KEY``:
#: the bound is exact unless this many other admissions commit while one admission is in flight.
QUEUE_LOCK_HEADROOM = 256


def _size(sub: Submission) -> int:
    parts: list[Any] = [sub.prompt, sub.messages, sub.grammar, sub.json_schema, sub.stop]
    if sub.tools is not None or sub.tool_choice is not None:  # a request without tools measures as it always did
        parts += [sub.tools, sub.tool_choice]
    if sub.input is not None:
        parts.append(sub.input)
    return len(json.dumps(parts, ensure_ascii=False).encode())


def _lock_queue(session: Session, queued: int, max_queue: int) -> bool:
    """Near a full queue, hold it until commit, so counting it and joining it is one step.

    Without it two PostgreSQL admissions that both count ``max_queue − 1``
    would both join. Far from full (``queued`` counted without it) no lock is
    taken, so admissions do not wait on each other: to overshoot, more than
    ``QUEUE_LOCK_HEADROOM`` admissions would have to commit while one is in
    flight. SQLite needs nothing (``BEGIN IMMEDIATE`` already serializes
    writers); returns whether a lock was taken.
    """
    if session.get_bind().dialect.name != "postgresql" or queued < max_queue - QUEUE_LOCK_HEADROOM:
        return False
    session.execute(select(func.pg_advisory_xact_lock(QUEUE_LOCK_KEY)))
    return True


_BY_REFERENCE = select(JobRow).where(JobRow.account_id == bindparam("p_account_id"),
                                     JobRow.reference == bindparam("p_reference"))


# Built once and run on the connection: the ORM's flush of a new object costs several times the INSERT itself.
_INSERT_JOB = insert(JobRow).returning(JobRow.seq)
#: Every column of a new job that admission leaves empty, so the row attached after the INSERT is fully loaded.
_UNWRITTEN = {column.key: None for column in inspect(JobRow).column_attrs}


def _insert_job(session: Session, values: dict[str, Any]) -> JobRow:
    """Insert a new job and return it as a persistent ``JobRow`` of ``session``, as ``add`` and ``flush`` would.

    It joins the identity map with every column loaded (no refresh to read
    it), so a claim in the same transaction loads and starts this very object.
    """
    seq = session.connection().execute(_INSERT_JOB, values).scalar_one()
    row = JobRow(**{**_UNWRITTEN, **values, "seq": seq})
    make_transient_to_detached(row)
    session.add(row)
    return row


def _existing(session: Session, account_id: int, sub: Submission) -> JobRow | None:
    """The job a reused reference already names; a conflict if its parameters differ."""
    if sub.reference is None:
        return None
    existing = session.scalar(_BY_REFERENCE, {"p_account_id": account_id, "p_reference": sub.reference})
    if existing is not None and existing.request_hash != sub.fingerprint():
        raise ReferenceConflict(sub.reference, existing.id)
    return existing


@dataclass(frozen=True)
class Priced:
    """A request's quote and prompt tokens, counted before any transaction opens."""

    quote: int
    prompt_tokens: int
    #: An embedding job: its prompt tokens are its inputs', priced at ``fee_per_embedding_token``, and it
    #: generates nothing (``max_tokens`` 0).
    embedding: bool = False

    def rates(self, settings: HerderSettings) -> tuple[int, int, int]:
        """``(base_fee, fee_per_token, fee_per_cached_token)`` the job is quoted, and so charged, at."""
        if self.embedding:
            return settings.base_fee, settings.fee_per_embedding_token, settings.fee_per_embedding_token
        return settings.base_fee, settings.fee_per_token, settings.cached_token_fee

    def max_tokens(self, sub: Submission) -> int:
        return 0 if self.embedding else sub.max_tokens


def admit(
    session: Session,
    settings: HerderSettings,
    priced: Priced,
    api_key: str,
    sub: Submission,
    now: float,
    served: bool = True,
    windows: limits.Reservation | None = None,
) -> tuple[JobRow, bool]:
    """Admit ``sub``, already checked and priced, for the key's account;
    returns the job and whether it is new.

    A retried reference returns its job even while no worker serves the model
    (its money is already held); a new request for an unserved model is
    refused with ``NoWorkers``. Raises an ``AdmissionError``,
    ``InvalidRequest`` or ``InsufficientFunds`` with nothing held. The caller commits.

    The account's fair-share limits (``router.core.limits``) are checked
    here: its queued jobs in this transaction, its requests and tokens per
    minute in ``windows`` (last, once nothing else can refuse; without
    ``windows`` they are not counted).
    """
    # What follows reads on the connection, which does not autoflush: first write what the caller left pending
    # (usually nothing, and then this costs nothing), so every count sees it.
    session.flush()
    # Locked (PostgreSQL): this account's admissions follow one another, so its share of the queue and
    # its references are counted exactly, while other accounts' admissions go on beside them.
    account = ledger.requester_by_key(session, api_key, lock=True)
    request.check_reference(sub)
    existing = _existing(session, account.id, sub)
    if existing is not None:
        return existing, False
    if not served:
        raise NoWorkers(sub.model)

    job_id = uuid.uuid4().hex
    quoted, prompt_tokens = priced.quote, priced.prompt_tokens
    max_tokens = priced.max_tokens(sub)
    base_fee, fee_per_token, fee_per_cached_token = priced.rates(settings)
    offered = fees.offer(quoted, sub.fee, sub.multiplier)
    if offered < quoted:
        raise InsufficientFee(quoted, offered)
    share = limits.of(session, settings, account.id)
    limits.check_request(share, prompt_tokens, max_tokens, sub.n)
    queued, own = limits.queued_of(session, account.id)
    if _lock_queue(session, queued, settings.max_queue):
        queued, own = limits.queued_of(session, account.id)
    if queued >= settings.max_queue:
        raise QueueFull(queued, settings.max_queue)
    # One account fills only its share of the queue (counted under the account's lock, so exactly).
    limits.check_queued(own, share)

    ledger.hold(session, account, offered, job_id)  # InsufficientFunds: nothing held
    bid = fees.bid_ppm(offered, quoted)
    row = _insert_job(session, {
        "id": job_id,
        "account_id": account.id,
        "reference": sub.reference,
        "request_hash": sub.fingerprint(),
        "model": sub.model,
        "request": json.dumps(_signed_generation(sub)),
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "n": sub.n,
        "quote": quoted,
        "base_fee": base_fee,
        "fee_per_token": fee_per_token,
        "fee_per_cached_token": fee_per_cached_token,
        "offered": offered,
        "bid_ppm": bid,
        "priority": queue.priority(bid, now, settings.aging_per_s),
        "state": QUEUED,
        "attempt": 0,
        "created_at": now,
        "deadline_at": None if sub.deadline_s is None else now + sub.deadline_s,
        "callback_task": sub.callback_task,
        # Celery's own default queue when the requester names none.
        "callback_queue": sub.callback_queue or ("celery" if sub.callback_task else None),
        "webhook_url": sub.webhook_url,
        "delivered": "",
        "delivery_due": False,
    })
    if windows is not None:
        # Last: a refusal here rolls the hold back, and nothing after it refuses
        # (a failed commit gives the entry back through the reservation).
        windows.take(account, job_id, limits.request_tokens(prompt_tokens, max_tokens, sub.n), share, now)
    return row, True


def price(settings: HerderSettings, counter: TokenCounting, sub: Submission) -> Priced:
    """The quote and prompt tokens of a request that passes every check but the money.

    Everything that can refuse a request without the ledger happens here —
    fields, response channels, the webhook's target, the grammar or JSON
    schema against the model's vocabulary, the context window — so quotes
    and admissions refuse exactly the same requests.
    """
    request.check(sub, settings.max_tokens_cap)
    size = _size(sub)
    if size > settings.max_request_bytes:
        raise RequestTooLarge(size, settings.max_request_bytes)
    if sub.webhook_url is not None:
        webhooks.check_target(sub.webhook_url, settings.webhook_allowed)
    job = as_job("quote", 0, sub.generation(), 0.0, 0.0)
    if job.is_embedding:
        return _price_embedding(settings, counter, job)
    prompt_tokens = counter.prompt_tokens(job)  # UnknownModelRequested for a model we lack
    # Each of the n completions is its own sequence of prompt + max_tokens.
    check_fits(prompt_tokens, sub.max_tokens, settings.n_ctx)
    counter.check_grammar(job)  # BadGrammar now, not in a worker's slot after the hold
    # Nothing assumed cached: the hold must cover the worst case.
    quoted = fees.quote(settings.base_fee, settings.fee_per_token, prompt_tokens, sub.max_tokens, sub.n)
    return Priced(quoted, prompt_tokens)


def _price_embedding(settings: HerderSettings, counter: TokenCounting, job: Job) -> Priced:
    """An embedding job's quote: every input counted with the model's tokenizer, each within its context."""
    lengths = counter.input_tokens(job)  # UnknownModelRequested, or BadInput for a token the model lacks
    embedding_job.check_lengths(lengths, settings.n_ctx)
    if job.dimensions is not None:
        size = counter.embedding_size(job.model)
        if job.dimensions != size:
            # Cutting a vector short keeps its meaning only for a model trained for it (matryoshka);
            # a GGUF does not say whether its model was, and a generative one was not.
            raise UnsupportedParameter("dimensions", f"{job.model} gives {size}-dimensional embeddings and is "
                                                     f"not known to allow shorter ones; ask for {size} or leave it out")
    total = sum(lengths)
    return Priced(fees.embedding_quote(settings.base_fee, settings.fee_per_embedding_token, total), total,
                  embedding=True)


def _signed_generation(sub: Submission) -> dict[str, Any]:
    """The generation fields the worker will get, with a seed fixed for the job.

    A job that asks for no seed still gets one of its own, fresh from the OS,
    so no job's sampling follows another's; and because every attempt of the
    job uses it, an attempt that runs again after a lost worker reproduces the
    text already streamed instead of contradicting it.
    """
    generation = sub.generation()
    if generation["seed"] is None:
        generation["seed"] = secrets.randbelow(MAX_SEED + 1)
    return generation
