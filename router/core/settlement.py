"""How jobs end: settle a result, fail, expire, cancel — each exactly once.

Every function here takes the caller's transaction, locks the job row, and
acts only if the job is still in the state it expects; a redelivered result,
a late lease check or a second cancel therefore changes nothing. A finished
job is charged ``multiplier × actual cost`` (at most its hold) and gets the
rest back, and so is one its time limit cut short (it ends ``failed``, with
``GenerationTimedOut``); any other ending returns the whole hold.

Only a result whose provenance verifies is settled (``provenance.check``:
signed by the house or a registered operator, proving receipt of the very
attempt, from the holder of its claim, for the registry's model id); any
other is ignored and the attempt's lease runs out. The actual cost counts the
tokens each completion generated as the worker signed them (a text can be
made of more tokens than a recount of it finds: a grammar of single spaces),
never more than ``max_tokens``, and the prompt tokens a worker reused from
its cache at the cached-token fee the job was quoted with. An embedding job's
actual cost is its quote (its inputs' tokens as the herder counted them, at
the embedding fee), and only a result with one vector per input is charged:
any other is refunded whole. When an operator's
worker produced it, that operator earns ``LLAMAS_OPERATOR_SHARE`` of the
charge (rounded down) and the house captures the rest; the house's own
workers' charges the house captures whole.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from llama_tasks import embedding_job
from llama_tasks.result import TIME_LIMIT, Choice, Result
from router.core import fees, ledger, operators, provenance, queue
from router.core.errors import InvalidOffer, JobNotQueued, UnknownJob
from router.core.models import CANCELLED, DONE, EXPIRED, FAILED, QUEUED, RUNNING, Account, JobRow, width
from router.core.parts import TokenCounting
from router.core.provenance import Keys
from router.core.settings import HerderSettings

log = logging.getLogger(__name__)

#: The longest finish reason kept: a worker's word, stored as it came up to this.
FINISH_REASON_CHARS = 32
#: The one failure that is paid for: its time limit cut the generation short, after work was done.
CHARGED_FAILURE = "GenerationTimedOut"


def chargeable(row: JobRow) -> bool:
    """Whether a final job may have been charged: it finished, or its time limit cut it short."""
    return row.state == DONE or (row.state == FAILED and row.error == CHARGED_FAILURE)


@functools.cache
def _locked_query(column: str, postgres: bool) -> Any:
    """The job whose ``column`` is ``:p_value``, locked on PostgreSQL; built once per shape."""
    query = select(JobRow).where(getattr(JobRow, column) == bindparam("p_value"))
    return query.with_for_update() if postgres else query


def _locked(session: Session, **where: Any) -> JobRow | None:
    ((column, value),) = where.items()
    postgres = session.get_bind().dialect.name == "postgresql"
    return session.scalar(_locked_query(column, postgres), {"p_value": value})


def _account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id)
    assert account is not None  # a foreign key
    return account


def _storable(value: object, column: str | None = None) -> str:
    """``value`` as text PostgreSQL will store: no NUL, no wider than its column.

    What workers report is stored as it came on SQLite too, so a result that
    settles on one backend settles on both instead of failing the commit.
    """
    text = str(value).replace("\x00", "")
    return text if column is None else text[: width(column)]


def _refund_all(session: Session, row: JobRow, state: str, error: str, message: str, now: float) -> JobRow:
    held = ledger.held_for(session, row.id)
    if held:
        ledger.release(session, _account(session, row.account_id), held, row.id)
    row.state, row.error, row.error_message = state, _storable(error, "error"), _storable(message)
    row.charged, row.refunded, row.finished_at = 0, held, now
    row.lease_until = None
    return row


def settle(session: Session, settings: HerderSettings, counter: TokenCounting, keys: Keys, doc: dict[str, Any],
           now: float, claim: dict[str, Any] | None = None) -> JobRow | None:
    """Charge a completed attempt and record its answer; None if it is not current or not proven.

    ``doc`` is the result document as the worker sent it (its attestation
    signs it so); ``claim`` is the attempt's claim as Redis holds it, if any.
    """
    result = Result.from_json(doc)
    # No task id must not match (``task_id IS NULL`` would lock every queued job).
    row = _locked(session, task_id=result.task_id) if result.task_id else None
    if row is None or row.state != RUNNING or row.id != result.job_id or row.attempt != result.attempt:
        log.info("ignoring result for task %s: not a running attempt", result.task_id)
        return None
    if result.model_id != counter.model_id(row.model):
        # Not the model the requester paid for (or a forged id a receipt would vouch for): never settled;
        # the attempt's lease runs out and the job runs again.
        log.warning("ignoring result for task %s: it names model id %.16s…, not the registry's for %s",
                    result.task_id, _storable(result.model_id), row.model)
        return None
    proven = provenance.check(session, keys, doc, row, claim)
    if not proven.accepted:
        # Ids only: the document is the writer's word and may carry anything.
        log.warning("ignoring result for task %s (job %s attempt %d): %s", result.task_id, row.id, row.attempt,
                    proven.reason)
        return None
    operator = proven.operator
    embedded = _embedding_inputs(row.request)
    if embedded is not None:
        choices = _embeddings(result, embedded)
        if choices is None:
            # Signed, but not an answer to what was paid for: nothing is charged for it.
            log.warning("job %s attempt %d: its result lacks a vector per input; failed and refunded",
                        row.id, row.attempt)
            return _refund_all(session, row, FAILED, "EmbeddingsMissing",
                               "the worker's result did not hold one embedding per input", now)
        # Nothing an embedding does is unknown at the quote: its inputs' tokens, counted by the herder.
        completion, cached = 0, 0
    else:
        choices = _counted(row, result)
        completion = sum(c.completion_tokens for c in choices)
        cached = min(result.cached_tokens, row.prompt_tokens)
    # At the prices the job was quoted, whatever the prices are now.
    base_fee = settings.base_fee if row.base_fee is None else row.base_fee
    fee_per_token = settings.fee_per_token if row.fee_per_token is None else row.fee_per_token
    fee_per_cached = fee_per_token if row.fee_per_cached_token is None else row.fee_per_cached_token
    actual = fees.cost(base_fee, fee_per_token, fee_per_cached, row.prompt_tokens, cached, completion)
    held = ledger.held_for(session, row.id)
    charge = min(fees.charge(row.offered, row.quote, actual), held)
    earned = operators.share(charge, settings.operator_share_ppm) if operator is not None else 0
    if operator is not None and earned:
        # Two requesters' rows (the operator's, then the requester's refund): one locking order for all.
        ledger.lock_accounts(session, operator.account_id, row.account_id)
        ledger.earn(session, _account(session, operator.account_id), earned, row.id)
    if charge - earned:
        ledger.capture(session, charge - earned, row.id)
    if held - charge:
        ledger.release(session, _account(session, row.account_id), held - charge, row.id)
    row.state, row.finished_at, row.lease_until = DONE, now, None
    if any(c.finish_reason == TIME_LIMIT for c in choices):
        # Paid for like a cancel (the text was made, and may have been streamed),
        # but answered as the typed error it is: the requester asked for more.
        row.state, row.error = FAILED, CHARGED_FAILURE
        row.error_message = (f"the generation ran past its time limit; charged for the {completion} "
                             "completion tokens it made")
    row.completion_tokens, row.cached_tokens = completion, cached
    row.choices = json.dumps([c.to_json() for c in choices])
    row.charged, row.refunded = charge, held - charge
    row.worker = _storable(result.worker, "worker")
    row.operator = operator.name if operator is not None else None
    row.model_id = _storable(result.model_id, "model_id")
    row.timings = json.dumps(result.timings)
    return row


def _embedding_inputs(request_json: str) -> int | None:
    """How many inputs a job's stored request asks to embed; None for a generation."""
    inputs = json.loads(request_json).get("input")
    return len(inputs) if isinstance(inputs, list) else None


def _embeddings(result: Result, inputs: int) -> list[Choice] | None:
    """One choice per input, each with its vector and nothing else; None unless every input has one."""
    choices = [Choice(index=c.index, text="", finish_reason="stop", embedding=c.embedding)
               for c in result.choices[:inputs]]
    sizes = {embedding_job.dimensions_of(c.embedding) for c in choices}
    return choices if len(choices) == inputs and len(sizes) == 1 and 0 not in sizes else None


def _asked(request_json: str) -> tuple[bool, int]:
    """``(logprobs, top_logprobs)`` of a job's stored generation fields."""
    request = json.loads(request_json)
    top = request.get("top_logprobs", 0)
    return request.get("logprobs") is True, top if isinstance(top, int) and not isinstance(top, bool) else 0


def _counted(row: JobRow, result: Result) -> list[Choice]:
    """The first ``n`` completions, storable, each with its signed token count and only the logprobs asked for."""
    logprobs, top_logprobs = _asked(row.request)
    return [
        Choice(
            index=choice.index,
            text=_storable(choice.text),
            finish_reason=_storable(choice.finish_reason)[:FINISH_REASON_CHARS],
            # What the worker generated, as it signed it; every token is paid for, even one the
            # database cannot store (NUL), but never past what the job allowed.
            completion_tokens=min(choice.completion_tokens, row.max_tokens),
            logprobs=[entry | {"top_logprobs": entry["top_logprobs"][:top_logprobs]} for entry in choice.logprobs]
            if logprobs and choice.logprobs is not None else None,
        )
        for choice in result.choices[: max(row.n, 1)]
    ]


def fail_attempt(session: Session, settings: HerderSettings, task_id: str | None, error: str, message: str,
                 retryable: bool, now: float) -> JobRow | None:
    """Handle a failed attempt: queue it again while attempts remain, else fail and refund.

    Returns the row if the job ended (so its requester must be told).
    """
    row = _locked(session, task_id=task_id) if isinstance(task_id, str) else None
    if row is None or row.state != RUNNING:
        return None
    if retryable and row.attempt < settings.max_attempts:
        row.state, row.task_id, row.lease_until = QUEUED, None, None
        # The message stays out of the log: a worker's error text may quote the request.
        log.warning("job %s attempt %d failed (%s); queued again", row.id, row.attempt, error)
        return None
    return _refund_all(session, row, FAILED, error, message, now)


def reap_leases(session: Session, settings: HerderSettings, now: float) -> list[JobRow]:
    """Running jobs whose lease ran out (their worker vanished): retry or fail."""
    ended = []
    # In arrival order, so concurrent reapers lock rows in one order and never deadlock.
    query = (
        select(JobRow.task_id)
        .where(JobRow.state == RUNNING, JobRow.lease_until < now)
        .order_by(JobRow.seq)
    )
    for task_id in list(session.scalars(query)):
        row = fail_attempt(session, settings, task_id, "LeaseExpired",
                           "no result before the lease ran out", retryable=True, now=now)
        if row is not None:
            ended.append(row)
    return ended


def expire_deadlines(session: Session, now: float) -> list[JobRow]:
    """Queued jobs whose deadline passed before they started: full refund."""
    ended = []
    query = (
        select(JobRow.id)
        .where(JobRow.state == QUEUED, JobRow.deadline_at < now)
        .order_by(JobRow.seq)  # one locking order for concurrent ticks
    )
    for job_id in list(session.scalars(query)):
        row = _locked(session, id=job_id)
        if row is not None and row.state == QUEUED:
            ended.append(_refund_all(session, row, EXPIRED, "DeadlineExpired",
                                     "the deadline passed before the job started", now))
    return ended


def _own_queued(session: Session, account: Account, job_id: str) -> JobRow:
    row = _locked(session, id=job_id)
    if row is None or row.account_id != account.id:
        raise UnknownJob(job_id)
    if row.state != QUEUED:
        raise JobNotQueued(job_id, row.state)
    return row


def cancel(session: Session, account: Account, job_id: str, now: float) -> JobRow:
    """Cancel a queued job of ``account`` with a full refund."""
    row = _own_queued(session, account, job_id)
    return _refund_all(session, row, CANCELLED, "Cancelled", "cancelled by the requester", now)


def raise_bid(session: Session, settings: HerderSettings, account: Account, job_id: str,
              fee: int | None, multiplier: float | str | None) -> JobRow:
    """Raise a queued job's offer to a new total; the difference is held."""
    row = _own_queued(session, account, job_id)
    new_offer = fees.offer(row.quote, fee, multiplier)
    if new_offer <= row.offered:
        raise InvalidOffer(f"new offer {new_offer} must exceed the current {row.offered}")
    ledger.hold(session, account, new_offer - row.offered, row.id)
    row.offered = new_offer
    row.bid_ppm = fees.bid_ppm(new_offer, row.quote)
    row.priority = queue.priority(row.bid_ppm, row.created_at, settings.aging_per_s)
    return row
