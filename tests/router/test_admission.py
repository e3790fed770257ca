"""Admission: every refusal holds nothing and writes no job; holds are exact and idempotent."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest
from sqlalchemy import func, select

from llama_tasks.errors import (
    BadLogprobs,
    BadStop,
    ContextOverflow,
    EmptyPrompt,
    InvalidMaxTokens,
    InvalidRequest,
    SamplingOutOfRange,
)
from llama_tasks.job import MAX_STOP_CHARS, MAX_STOP_STRINGS
from router.core import admission, ledger, request
from router.core.errors import (
    BadChannel,
    BadDeadline,
    BadReference,
    InsufficientFee,
    InsufficientFunds,
    InvalidOffer,
    QueueFull,
    ReferenceConflict,
    RequestTooLarge,
    UnknownAccount,
    UnknownModelRequested,
)
from router.core.models import QUEUED, JobRow, Transfer
from router.core.request import Submission

from .conftest import T0, Herder, run_together

DEPOSIT = 1_000


class PoisonCounter:
    """A token counter that fails the test if anything asks it to count."""

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"a request refused on its face reached the tokenizer ({name})")


@pytest.fixture
def poison_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any hold fail the test: proves a refusal never reaches the ledger's money."""

    def hold(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("a refused request reached ledger.hold")

    monkeypatch.setattr(ledger, "hold", hold)


def assert_nothing_admitted(herder: Herder, balance: int = DEPOSIT) -> None:
    assert herder.balance("alice") == balance
    assert herder.jobs() == []
    with herder.sessions() as session:
        moved = session.scalar(
            select(func.count()).select_from(Transfer).where(Transfer.kind != "deposit")
        )
    assert moved == 0
    herder.assert_books()


# --- refusals ----------------------------------------------------------------


@dataclass
class Refusal:
    fields: dict[str, Any]
    error: type[Exception]
    #: Expected ``as_dict()`` of the error, when its facts matter.
    facts: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


#: Requests wrong on their face: refused before a token is counted.
ON_THEIR_FACE = {
    "empty-prompt": Refusal({"prompt": ""}, EmptyPrompt),
    "blank-prompt": Refusal({"prompt": " \n\t"}, EmptyPrompt),
    "no-prompt": Refusal({"prompt": None}, EmptyPrompt),
    "blank-messages": Refusal({"messages": [{"role": "user", "content": "  "}]}, EmptyPrompt),
    "prompt-and-messages": Refusal(
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, InvalidRequest),
    "max-tokens-0": Refusal({"max_tokens": 0}, InvalidMaxTokens, {"max_tokens": 0, "cap": 64},
                            {"max_tokens_cap": 64}),
    "max-tokens-negative": Refusal({"max_tokens": -3}, InvalidMaxTokens),
    "max-tokens-over-cap": Refusal({"max_tokens": 65}, InvalidMaxTokens,
                                   {"max_tokens": 65, "cap": 64}, {"max_tokens_cap": 64}),
    "max-tokens-bool": Refusal({"max_tokens": True}, InvalidMaxTokens),
    "max-tokens-float": Refusal({"max_tokens": 8.0}, InvalidMaxTokens),
    "temperature-high": Refusal({"temperature": 2.5}, SamplingOutOfRange,
                                {"name": "temperature", "value": 2.5, "low": 0.0, "high": 2.0}),
    "temperature-nan": Refusal({"temperature": math.nan}, SamplingOutOfRange),
    "top-p-negative": Refusal({"top_p": -0.1}, SamplingOutOfRange),
    "top-k-high": Refusal({"top_k": 1001}, SamplingOutOfRange),
    "seed-negative": Refusal({"seed": -1}, SamplingOutOfRange),
    "too-many-stops": Refusal({"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, BadStop),
    "stop-too-long": Refusal({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, BadStop),
    "stop-empty": Refusal({"stop": [""]}, BadStop),
    "n-0": Refusal({"n": 0}, SamplingOutOfRange, {"name": "n", "value": 0, "low": 1, "high": 8}),
    "n-9": Refusal({"n": 9}, SamplingOutOfRange, {"name": "n", "value": 9, "low": 1, "high": 8}),
    "n-bool": Refusal({"n": True}, SamplingOutOfRange),
    "logprobs-int": Refusal({"logprobs": 1}, BadLogprobs),
    "top-logprobs-without-logprobs": Refusal({"top_logprobs": 2}, BadLogprobs,
                                             {"param": "top_logprobs",
                                              "detail": "alternatives are returned only with logprobs true"}),
    "top-logprobs-21": Refusal({"logprobs": True, "top_logprobs": 21}, SamplingOutOfRange,
                               {"name": "top_logprobs", "value": 21, "low": 0, "high": 20}),
    "too-large": Refusal({"prompt": "llama " * 400}, RequestTooLarge,
                         {"size_bytes": len(json.dumps(["llama " * 400, None, None, None, []])),
                          "limit_bytes": 1024}, {"max_request_bytes": 1024}),
    "deadline-zero": Refusal({"deadline_s": 0}, BadDeadline),
    "deadline-negative": Refusal({"deadline_s": -5.0}, BadDeadline),
    "deadline-string": Refusal({"deadline_s": "10"}, BadDeadline),
    "deadline-bool": Refusal({"deadline_s": True}, BadDeadline),
    "deadline-nan": Refusal({"deadline_s": math.nan}, BadDeadline),
    "deadline-infinite": Refusal({"deadline_s": math.inf}, BadDeadline),
    "webhook-ftp": Refusal({"webhook_url": "ftp://example.com/hook"}, BadChannel),
    "webhook-not-url": Refusal({"webhook_url": "not a url"}, BadChannel),
    "webhook-no-host": Refusal({"webhook_url": "http://"}, BadChannel),
    "webhook-not-text": Refusal({"webhook_url": 42}, BadChannel),
    "webhook-too-long": Refusal({"webhook_url": "https://example.com/" + "a" * 2000}, BadChannel),
    "queue-without-task": Refusal({"callback_queue": "agent"}, BadChannel),
    "task-too-long": Refusal({"callback_task": "t" * 201}, BadChannel),
    "reference-too-long": Refusal({"reference": "r" * 201}, BadReference),
    "reference-empty": Refusal({"reference": ""}, BadReference),
    "reference-not-text": Refusal({"reference": 7}, BadReference),
}

#: Requests refused once their tokens are counted, before any money moves.
ONCE_COUNTED = {
    "unknown-model": Refusal({"model": "gpt-17"}, UnknownModelRequested),
    "fee-below-quote": Refusal({"fee": "QUOTE-1"}, InsufficientFee),
    "multiplier-below-1": Refusal({"multiplier": 0.5}, InsufficientFee),
    "fee-and-multiplier": Refusal({"fee": "QUOTE", "multiplier": 2}, InvalidOffer),
    "fee-zero": Refusal({"fee": 0}, InvalidOffer),
    "fee-float": Refusal({"fee": 50.0}, InvalidOffer),
    "multiplier-garbage": Refusal({"multiplier": "lots"}, InvalidOffer),
}


def _fill(fields: dict[str, Any], quote: int) -> dict[str, Any]:
    """Replace the placeholders QUOTE and QUOTE-1 with the request's real quote."""
    return {k: {"QUOTE": quote, "QUOTE-1": quote - 1}.get(v, v) if isinstance(v, str) else v
            for k, v in fields.items()}


@pytest.mark.parametrize("case", ON_THEIR_FACE.values(), ids=ON_THEIR_FACE.keys())
def test_a_request_wrong_on_its_face_is_refused_before_counting_or_holding(
    herder: Herder, case: Refusal, poison_hold: None
) -> None:
    herder.configure(**case.settings)
    key = herder.account("alice", deposit=DEPOSIT)

    with pytest.raises(case.error) as refused:
        herder.submit(key, counter=PoisonCounter(), **case.fields)

    if case.facts is not None:
        assert refused.value.as_dict() == case.facts  # type: ignore[attr-defined]
    assert_nothing_admitted(herder)


@pytest.mark.parametrize("case", ONCE_COUNTED.values(), ids=ONCE_COUNTED.keys())
def test_a_request_refused_on_its_price_or_model_holds_nothing(
    herder: Herder, case: Refusal, poison_hold: None
) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    quote = herder.quote(prompt="Say hello.", max_tokens=8)
    fields = _fill(case.fields, quote)

    with pytest.raises(case.error) as refused:
        herder.submit(key, **fields)

    if case.error is InsufficientFee:
        offered = fields.get("fee") or math.ceil(fields["multiplier"] * quote)
        # The original's "Insufficient payment" with X-Needed.
        assert refused.value.as_dict() == {"needed": quote, "offered": offered}  # type: ignore[attr-defined]
    if case.error is UnknownModelRequested:
        assert refused.value.model == "gpt-17"  # type: ignore[attr-defined]
        assert "smollm2" in refused.value.known  # type: ignore[attr-defined]
    assert_nothing_admitted(herder)


def test_a_prompt_that_cannot_fit_the_context_is_refused_with_its_counts(herder: Herder) -> None:
    herder.configure(n_ctx=128, max_tokens_cap=2048)
    key = herder.account("alice", deposit=DEPOSIT)
    prompt = "The llama is a domesticated South American camelid. " * 8
    prompt_tokens = herder.counter.prompt_tokens(
        request.as_job("x", 0, Submission(prompt=prompt, max_tokens=64).generation(), 0.0, 0.0)
    )
    assert 64 < prompt_tokens < 128  # fits alone, not with 64 more

    with pytest.raises(ContextOverflow) as refused:
        herder.submit(key, prompt=prompt, max_tokens=64)

    assert refused.value.as_dict() == {"prompt_tokens": prompt_tokens, "max_tokens": 64, "n_ctx": 128}
    assert_nothing_admitted(herder)
    # One token less of room and it fits: the bound is prompt + max_tokens <= n_ctx.
    herder.submit(key, prompt=prompt, max_tokens=128 - prompt_tokens)
    herder.assert_books()


def test_a_balance_below_the_offer_is_refused_with_nothing_held(herder: Herder) -> None:
    quote = herder.quote(prompt="Say hello.", max_tokens=8)
    key = herder.account("alice", deposit=quote * 2 - 1)

    with pytest.raises(InsufficientFunds) as refused:
        herder.submit(key, multiplier=2)

    assert refused.value.as_dict() == {"account": "alice", "balance": quote * 2 - 1,
                                       "needed": quote * 2}
    assert_nothing_admitted(herder, balance=quote * 2 - 1)


def test_an_unknown_api_key_is_refused_with_nothing_held(herder: Herder, poison_hold: None) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    with pytest.raises(UnknownAccount):
        herder.submit(key + "x")
    assert_nothing_admitted(herder)


def test_past_max_queue_new_work_is_refused_at_once(herder: Herder) -> None:
    herder.configure(max_queue=2)
    key = herder.account("alice", deposit=DEPOSIT)
    quote = herder.quote(prompt="Say hello.", max_tokens=8)
    first, _ = herder.submit(key), herder.submit(key)

    with pytest.raises(QueueFull) as refused:
        herder.submit(key)

    assert refused.value.as_dict() == {"queued": 2, "limit": 2}
    assert herder.balance("alice") == DEPOSIT - 2 * quote
    assert len(herder.jobs()) == 2
    herder.assert_books()
    # Only waiting jobs count: once one runs, there is room again.
    assert herder.claim(slots=1) == [first.id]
    herder.submit(key)
    assert len(herder.jobs()) == 3
    herder.assert_books()


def test_concurrent_admissions_never_overfill_the_queue(herder: Herder) -> None:
    herder.configure(max_queue=5)
    key = herder.account("alice", deposit=DEPOSIT * 10)

    results = run_together(20, lambda i: herder.submit(key, now=T0 + i))

    admitted = [r for r in results if isinstance(r, JobRow)]
    assert len(admitted) == 5, results
    assert all(isinstance(r, QueueFull) for r in results if not isinstance(r, JobRow)), results
    assert len(herder.jobs()) == 5
    herder.assert_books()


# --- what an admitted job holds and records ----------------------------------


def test_an_admitted_job_holds_its_offer_and_records_its_bid(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    quote = herder.quote(prompt="Say hello.", max_tokens=8)

    row = herder.submit(key, multiplier="1.5", deadline_s=30, callback_task="agent.on_response",
                        webhook_url="https://example.com/hook", reference="order-1")

    assert row.state == QUEUED and row.attempt == 0 and row.task_id is None
    assert (row.quote, row.offered) == (quote, math.ceil(quote * 1.5))
    assert row.bid_ppm == row.offered * 1_000_000 // quote
    assert row.created_at == T0 and row.deadline_at == T0 + 30
    assert row.callback_queue == "celery"  # Celery's default when none is named
    assert herder.transfers(row.id) == [("hold", row.offered)]
    assert herder.balance("alice") == DEPOSIT - row.offered
    herder.assert_books()


def test_the_admitted_row_is_every_column_the_database_holds(herder: Herder) -> None:
    """Admission writes the job with one INSERT and hands the row to the session as loaded: each of its
    columns must be what the database has (a column given a database default and left out of the
    INSERT's values would read None in the session until the next transaction)."""
    key = herder.account("alice", deposit=DEPOSIT)
    sub = herder._submission({"prompt": "Say hello.", "max_tokens": 8, "reference": "cols-1"})
    with herder.sessions.begin() as session:
        row, new = admission.admit(session, herder.settings, admission.price(herder.settings, herder.counter, sub),
                                   key, sub, T0)
        assert new
        in_session = {column.key: getattr(row, column.key) for column in JobRow.__table__.columns}
        stored = session.connection().execute(select(JobRow.__table__).where(JobRow.id == row.id)).one()._asdict()
    assert in_session == stored
    herder.assert_books()


# --- idempotency -------------------------------------------------------------


def test_a_retried_submit_returns_the_same_job_and_holds_once(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    sub = Submission(prompt="Grade: llamas are great", max_tokens=8, reference="r-1")

    with herder.sessions.begin() as session:
        first, created = admission.admit(session, herder.settings, admission.price(herder.settings, herder.counter, sub),
                                         key, sub, T0)
        assert created
    with herder.sessions.begin() as session:
        again, created = admission.admit(session, herder.settings, admission.price(herder.settings, herder.counter, sub),
                                         key, Submission(**vars(sub)), T0 + 5)
        assert not created and again.id == first.id

    assert len(herder.jobs()) == 1
    assert herder.transfers(first.id) == [("hold", first.offered)]
    assert herder.balance("alice") == DEPOSIT - first.offered
    herder.assert_books()


def test_a_retry_is_answered_even_when_the_queue_has_filled(herder: Herder) -> None:
    herder.configure(max_queue=1)
    key = herder.account("alice", deposit=DEPOSIT)
    first = herder.submit(key, reference="r-1")
    assert herder.submit(key, reference="r-1").id == first.id
    with pytest.raises(QueueFull):
        herder.submit(key, reference="r-2")
    herder.assert_books()


def test_a_reused_reference_with_other_parameters_is_a_conflict(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    first = herder.submit(key, reference="r-1", max_tokens=8)
    balance = herder.balance("alice")

    for change in ({"max_tokens": 9}, {"prompt": "Say goodbye."}, {"multiplier": 2}):
        with pytest.raises(ReferenceConflict) as conflict:
            herder.submit(key, reference="r-1", **change)
        assert conflict.value.as_dict() == {"reference": "r-1", "job_id": first.id}

    assert herder.balance("alice") == balance
    assert [row.id for row in herder.jobs()] == [first.id]
    herder.assert_books()


def test_references_belong_to_their_account(herder: Herder) -> None:
    alice = herder.account("alice", deposit=DEPOSIT)
    bob = herder.account("bob", deposit=DEPOSIT)
    assert herder.submit(alice, reference="r-1").id != herder.submit(bob, reference="r-1").id
    assert herder.balance("alice") == herder.balance("bob") < DEPOSIT
    herder.assert_books()


def test_concurrent_submits_with_one_reference_make_one_job_and_one_hold(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)

    results = run_together(10, lambda i: herder.submit(key, reference="same", prompt="Hi there"))

    assert all(isinstance(r, JobRow) for r in results), results
    assert len({r.id for r in results}) == 1
    (row,) = herder.jobs()
    assert herder.transfers(row.id) == [("hold", row.offered)]
    assert herder.balance("alice") == DEPOSIT - row.offered
    herder.assert_books()


# --- the race for a balance --------------------------------------------------


def test_fifty_admissions_against_a_balance_for_ten_admit_exactly_ten(herder: Herder) -> None:
    quote = herder.quote(prompt="Say hello.", max_tokens=8)
    key = herder.account("alice", deposit=10 * quote)

    results = run_together(50, lambda i: herder.submit(key, now=T0 + i))

    admitted = [r for r in results if isinstance(r, JobRow)]
    refused = [r for r in results if isinstance(r, InsufficientFunds)]
    assert (len(admitted), len(refused)) == (10, 40), results
    assert herder.balance("alice") == 0
    assert {row.id for row in herder.jobs()} == {row.id for row in admitted}
    assert all(row.offered == quote for row in admitted)
    herder.assert_books()


@pytest.mark.parametrize("offer", [{"fee": 2**63}, {"fee": 10**17}, {"multiplier": "1e13"}])
def test_an_absurd_offer_is_refused_as_an_offer_with_nothing_held(
    herder: Herder, offer: dict[str, Any]
) -> None:
    # Enough money that only the offer's size can stop it: its bid would overflow a BIGINT.
    key = herder.account("alice", deposit=2**62)
    with pytest.raises(InvalidOffer):
        herder.submit(key, **offer)
    assert_nothing_admitted(herder, balance=2**62)


def test_choices_are_part_of_a_references_request_and_old_fingerprints_still_match(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    job = herder.submit(key, reference="r", max_tokens=8)

    again = herder.submit(key, reference="r", max_tokens=8, n=1, logprobs=False, top_logprobs=0)
    assert again.id == job.id
    with pytest.raises(ReferenceConflict):
        herder.submit(key, reference="r", max_tokens=8, n=2)
    with pytest.raises(ReferenceConflict):
        herder.submit(key, reference="r", max_tokens=8, logprobs=True)
    assert len(herder.jobs()) == 1
    # A job admitted before n, logprobs, tools and embeddings existed was fingerprinted without them.
    before = Submission(prompt="Say hello.", max_tokens=8).to_dict()
    for name in ("reference", "n", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "input",
                 "dimensions"):
        del before[name]
    assert job.request_hash == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    herder.assert_books()
