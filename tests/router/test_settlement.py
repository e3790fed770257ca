"""Settlement: every admitted job ends exactly once, charged at most once, the rest returned."""

from __future__ import annotations

import json
from typing import Any

import pytest
from alembic import command
from sqlalchemy import func, inspect, select, text

from router.core import fees, ledger, settlement, views
from router.core.db import alembic_config, make_engine, upgrade
from router.core.errors import InsufficientFunds, InvalidOffer, JobNotQueued, UnknownJob
from router.core.models import (
    CANCELLED,
    DONE,
    ESCROW,
    EXPIRED,
    FAILED,
    QUEUED,
    REVENUE,
    RUNNING,
    WORLD,
    JobRow,
    Transfer,
)

from .conftest import T0, Herder, run_together

DEPOSIT = 10_000
TEXT = "Llamas hum softly when they are curious, worried, or simply content."


def snapshot(herder: Herder) -> tuple[Any, ...]:
    """Everything settlement could change: balances, job rows, transfers."""
    with herder.sessions() as session:
        jobs = [(r.id, r.state, r.attempt, r.task_id, r.charged, r.refunded, views.response(r)["text"])
                for r in session.scalars(select(JobRow).order_by(JobRow.seq))]
        transfers = session.scalar(select(func.count()).select_from(Transfer))
    return herder.balances("alice", ESCROW, REVENUE, WORLD), jobs, transfers


def settle(herder: Herder, doc: dict[str, Any], now: float = T0 + 60) -> JobRow | None:
    return herder.settle(doc, now)


def fail(herder: Herder, task_id: str | None, retryable: bool = True,
         now: float = T0 + 60) -> JobRow | None:
    with herder.sessions.begin() as session:
        return settlement.fail_attempt(session, herder.settings, task_id or "", "WorkerLost",
                                       "the worker died", retryable, now)


def account(herder: Herder, session: Any, name: str = "alice") -> Any:
    return ledger.account_by_name(session, name)


@pytest.fixture
def alice(herder: Herder) -> str:
    return herder.account("alice", deposit=DEPOSIT)


# --- a finished job ----------------------------------------------------------


def test_a_finished_job_pays_its_multiplier_of_the_tokens_the_worker_signed_it_generated(
    herder: Herder, alice: str
) -> None:
    job = herder.submit(alice, max_tokens=64, multiplier="1.1")
    herder.claim(slots=1)
    recount = herder.counter.completion_tokens("smollm2", TEXT)
    completion = recount + 7  # generated as more, smaller tokens than a recount of the text finds
    assert 1 < completion < 64

    # The document's own sum and prompt tokens are the worker's word for nothing: each choice's signed count is.
    row = settle(herder, herder.result(job.id, TEXT, completion_tokens=completion, prompt_tokens=1))

    assert row is not None and row.state == DONE
    actual = fees.quote(5, 2, job.prompt_tokens, completion)
    charged = job.offered * actual // job.quote
    assert charged > fees.charge(job.offered, job.quote, fees.quote(5, 2, job.prompt_tokens, recount))
    assert (row.completion_tokens, row.charged, row.refunded) == (
        completion, charged, job.offered - charged)
    assert (views.response(row)["text"], views.response(row)["finish_reason"], row.worker) == (TEXT, "stop", "w@test")
    assert herder.transfers(job.id) == [("hold", job.offered), ("capture", charged),
                                        ("release", job.offered - charged)]
    assert herder.balances("alice", REVENUE) == {"alice": DEPOSIT - charged, REVENUE: charged}
    herder.assert_books()


def test_multiplier_1_1_on_a_quote_of_100_pays_1_1_times_the_cost(herder: Herder, alice: str) -> None:
    # base 10 + 1/token: pick max_tokens so the quote is exactly 100.
    herder.configure(base_fee=10, fee_per_token=1)
    prompt_tokens = herder.quote(max_tokens=1) - 10 - 1
    job = herder.submit(alice, max_tokens=90 - prompt_tokens, multiplier=1.1)
    assert (job.quote, job.offered) == (100, 110)
    herder.claim(slots=1)

    row = settle(herder, herder.result(job.id, TEXT))

    cost = 10 + prompt_tokens + herder.counter.completion_tokens("smollm2", TEXT)
    assert row is not None and row.charged == 110 * cost // 100 and row.refunded == 110 - row.charged
    herder.assert_books()


def test_a_worker_that_overruns_pays_no_more_than_its_hold(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=2, multiplier=2)
    herder.claim(slots=1)

    row = settle(herder, herder.result(job.id, TEXT * 5))

    assert row is not None and (row.charged, row.refunded) == (job.offered, 0)
    assert herder.transfers(job.id) == [("hold", job.offered), ("capture", job.offered)]
    herder.assert_books()


def test_a_result_without_text_is_charged_for_no_completion_tokens(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)

    row = settle(herder, herder.sign(herder.result(job.id, TEXT) | {"choices": [{"index": 0, "text": None}]}))

    assert row is not None and (views.response(row)["text"], row.completion_tokens) == ("", 0)
    assert row.charged == fees.quote(5, 2, job.prompt_tokens, 0)
    herder.assert_books()


def test_a_result_postgresql_cannot_store_as_sent_still_settles(herder: Herder, alice: str) -> None:
    # NUL is valid in a generation but not in PostgreSQL text; an odd worker name
    # or finish reason must not outgrow its column. Either would leave the job
    # running, its hold stuck, until its lease ran out.
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)
    raw = "a\x00b" + TEXT

    row = settle(herder, herder.result(job.id, raw, worker="w" * 300,
                                       finish_reason="f" * 40 + "\x00"))

    assert row is not None
    stored = herder.job(job.id)
    assert stored.state == DONE and views.response(stored)["text"] == "ab" + TEXT
    assert (stored.worker, views.response(stored)["finish_reason"]) == ("w" * 200, "f" * 32)
    # Charged for every token the worker generated, NUL included.
    completion = herder.counter.completion_tokens("smollm2", raw)
    assert stored.completion_tokens == completion
    assert stored.charged == fees.quote(5, 2, job.prompt_tokens, completion)
    herder.assert_books()


def test_a_failure_postgresql_cannot_store_as_sent_still_refunds(herder: Herder, alice: str) -> None:
    job = herder.submit(alice)
    herder.claim(slots=1)

    with herder.sessions.begin() as session:
        ended = settlement.fail_attempt(session, herder.settings, herder.job(job.id).task_id,
                                        "E" * 100, "bad \x00 byte", False, T0)
        assert ended is not None

    stored = herder.job(job.id)
    assert (stored.state, stored.error, stored.error_message) == (FAILED, "E" * 64, "bad  byte")
    assert herder.balance("alice") == DEPOSIT
    herder.assert_books()


# --- results that must change nothing ------------------------------------------


def test_a_result_for_an_unknown_or_missing_task_changes_nothing(herder: Herder, alice: str) -> None:
    job = herder.submit(alice)
    herder.submit(alice)  # queued, with no task id of its own
    herder.claim(slots=1)
    before = snapshot(herder)
    good = herder.result(job.id, TEXT)

    assert settle(herder, good | {"task_id": "no-such-task"}) is None
    assert settle(herder, {k: v for k, v in good.items() if k != "task_id"}) is None
    assert settle(herder, good | {"task_id": None}) is None
    assert settle(herder, good | {"job_id": "someone-elses-job"}) is None

    assert snapshot(herder) == before
    herder.assert_books()


def test_a_result_of_a_stale_attempt_changes_nothing(herder: Herder, alice: str) -> None:
    job = herder.submit(alice)
    herder.claim(slots=1)
    stale = herder.result(job.id, TEXT)
    assert fail(herder, stale["task_id"]) is None  # retried: queued again
    herder.claim(slots=1)
    current = herder.result(job.id, TEXT)
    assert (stale["attempt"], current["attempt"]) == (1, 2)
    before = snapshot(herder)

    assert settle(herder, stale) is None
    assert settle(herder, current | {"attempt": 1}) is None
    assert snapshot(herder) == before

    row = settle(herder, current)
    assert row is not None and row.state == DONE and row.attempt == 2
    herder.assert_books()


def test_a_redelivered_result_charges_once(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)
    doc = herder.result(job.id, TEXT)
    assert settle(herder, doc) is not None
    after_first = snapshot(herder)

    assert settle(herder, doc) is None
    assert settle(herder, doc, now=T0 + 3600) is None
    assert fail(herder, doc["task_id"]) is None  # a late failure report of the same attempt

    assert snapshot(herder) == after_first
    assert [kind for kind, _ in herder.transfers(job.id)] == ["hold", "capture", "release"]
    herder.assert_books()


def test_concurrent_deliveries_of_one_result_charge_once(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)
    doc = herder.result(job.id, TEXT)

    settled = run_together(8, lambda i: settle(herder, dict(doc)))

    assert not any(isinstance(s, Exception) for s in settled), settled
    assert sum(s is not None for s in settled) == 1
    assert [kind for kind, _ in herder.transfers(job.id)] == ["hold", "capture", "release"]
    herder.assert_books()


# --- failures, leases, deadlines -----------------------------------------------


def test_a_failed_attempt_is_retried_while_attempts_remain_then_refunded(
    herder: Herder, alice: str
) -> None:
    herder.configure(max_attempts=2)
    job = herder.submit(alice)
    herder.claim(slots=1)
    task = herder.job(job.id).task_id

    assert fail(herder, task) is None
    row = herder.job(job.id)
    assert (row.state, row.task_id, row.attempt) == (QUEUED, None, 1)
    herder.assert_books()  # still held, in full

    herder.claim(slots=1)
    ended = fail(herder, herder.job(job.id).task_id, now=T0 + 90)

    assert ended is not None and ended.state == FAILED
    assert (ended.charged, ended.refunded, ended.error, ended.finished_at) == (
        0, job.offered, "WorkerLost", T0 + 90)
    assert herder.balance("alice") == DEPOSIT
    assert fail(herder, task) is None and fail(herder, ended.task_id) is None
    herder.assert_books()


def test_a_refused_attempt_fails_at_once_with_a_full_refund(herder: Herder, alice: str) -> None:
    job = herder.submit(alice)
    herder.claim(slots=1)

    ended = fail(herder, herder.job(job.id).task_id, retryable=False)

    assert ended is not None and (ended.state, ended.attempt, ended.refunded) == (FAILED, 1, job.offered)
    assert herder.balance("alice") == DEPOSIT
    herder.assert_books()


def test_expired_leases_are_retried_then_failed_and_refunded(herder: Herder, alice: str) -> None:
    herder.configure(max_attempts=2)
    lease_s = herder.settings.lease_s
    job = herder.submit(alice)
    herder.claim(slots=1, now=T0)
    first = herder.result(job.id, TEXT)

    with herder.sessions.begin() as session:
        assert settlement.reap_leases(session, herder.settings, T0 + lease_s) == []
    assert herder.job(job.id).state == RUNNING  # the lease has not run out yet
    with herder.sessions.begin() as session:
        assert settlement.reap_leases(session, herder.settings, T0 + lease_s + 1) == []
    assert herder.job(job.id).state == QUEUED

    herder.claim(slots=1, now=T0 + 1000)
    with herder.sessions.begin() as session:
        ended = settlement.reap_leases(session, herder.settings, T0 + 1000 + lease_s + 1)
        assert [(r.id, r.state, r.error) for r in ended] == [(job.id, FAILED, "LeaseExpired")]
    assert herder.balance("alice") == DEPOSIT
    # The vanished worker's answer turns up late: the job already ended.
    assert settle(herder, first) is None
    herder.assert_books()


def test_a_job_not_started_by_its_deadline_expires_with_a_full_refund(
    herder: Herder, alice: str
) -> None:
    started = herder.submit(alice, deadline_s=10)
    waiting = herder.submit(alice, deadline_s=10)
    herder.submit(alice)  # no deadline: waits forever
    assert herder.claim(slots=1, now=T0 + 5) == [started.id]

    with herder.sessions.begin() as session:
        assert settlement.expire_deadlines(session, T0 + 10) == []
    with herder.sessions.begin() as session:
        ended = settlement.expire_deadlines(session, T0 + 11)
        assert [(r.id, r.state, r.refunded) for r in ended] == [(waiting.id, EXPIRED, waiting.offered)]
    with herder.sessions.begin() as session:
        assert settlement.expire_deadlines(session, T0 + 12) == []  # refunded once

    assert herder.job(started.id).state == RUNNING  # it started in time
    assert herder.balance("alice") == DEPOSIT - 2 * waiting.offered
    herder.assert_books()


# --- what a requester can do to a queued job ----------------------------------


def test_cancel_refunds_in_full_and_only_once(herder: Herder, alice: str) -> None:
    job = herder.submit(alice)
    with herder.sessions.begin() as session:
        row = settlement.cancel(session, account(herder, session), job.id, T0 + 1)
        assert (row.state, row.refunded, row.charged) == (CANCELLED, job.offered, 0)
    assert herder.balance("alice") == DEPOSIT
    before = snapshot(herder)

    with herder.sessions.begin() as session, pytest.raises(JobNotQueued) as again:
        settlement.cancel(session, account(herder, session), job.id, T0 + 2)
    assert again.value.as_dict() == {"job_id": job.id, "state": CANCELLED}
    assert snapshot(herder) == before
    assert herder.claim(slots=1) == []
    herder.assert_books()


def test_only_the_owner_can_cancel_and_only_while_queued(herder: Herder, alice: str) -> None:
    herder.account("bob", deposit=DEPOSIT)
    job = herder.submit(alice)
    other = herder.submit(alice)
    herder.claim(slots=1)  # the first starts
    before = snapshot(herder)

    with herder.sessions.begin() as session:
        with pytest.raises(UnknownJob):
            settlement.cancel(session, account(herder, session, "bob"), other.id, T0)
        with pytest.raises(UnknownJob):
            settlement.cancel(session, account(herder, session), "no-such-job", T0)
        with pytest.raises(JobNotQueued) as running:
            settlement.cancel(session, account(herder, session), job.id, T0)
        assert running.value.state == RUNNING

    assert snapshot(herder) == before
    herder.assert_books()


def test_raise_bid_holds_the_difference_and_moves_the_job_up(herder: Herder, alice: str) -> None:
    jobs = [herder.submit(alice, now=T0 + i, max_tokens=32) for i in range(3)]
    last = jobs[-1]

    with herder.sessions.begin() as session:
        row = settlement.raise_bid(session, herder.settings, account(herder, session), last.id,
                                   None, 2)
        assert (row.offered, row.bid_ppm) == (2 * last.quote, 2 * fees.PPM)
    assert herder.transfers(last.id) == [("hold", last.quote), ("hold", last.quote)]
    assert herder.balance("alice") == DEPOSIT - 4 * last.quote
    herder.assert_books()

    assert herder.claim(slots=1) == [last.id]
    # It pays its new multiplier of what it used, and gets the rest of both holds back.
    done = settle(herder, herder.result(last.id, TEXT))
    actual = fees.quote(5, 2, last.prompt_tokens, herder.counter.completion_tokens("smollm2", TEXT))
    assert done is not None and (done.charged, done.refunded) == (2 * actual, 2 * last.quote - 2 * actual)
    herder.assert_books()


def test_a_raised_fee_is_the_new_total_and_a_cancel_returns_every_hold(
    herder: Herder, alice: str
) -> None:
    job = herder.submit(alice)
    with herder.sessions.begin() as session:
        settlement.raise_bid(session, herder.settings, account(herder, session), job.id,
                             job.quote + 7, None)
    assert herder.transfers(job.id) == [("hold", job.quote), ("hold", 7)]

    with herder.sessions.begin() as session:
        row = settlement.cancel(session, account(herder, session), job.id, T0)
        assert row.refunded == job.quote + 7
    assert herder.balance("alice") == DEPOSIT
    herder.assert_books()


@pytest.mark.parametrize(
    ("fee", "multiplier", "error"),
    [(None, 1, InvalidOffer), ("SAME", None, InvalidOffer), ("LESS", None, InvalidOffer),
     (None, "abc", InvalidOffer), (None, 1000, InsufficientFunds)],
)
def test_a_refused_raise_changes_nothing(
    herder: Herder, alice: str, fee: Any, multiplier: Any, error: type[Exception]
) -> None:
    job = herder.submit(alice, multiplier="1.5")
    fee = {"SAME": job.offered, "LESS": job.offered - 1}.get(fee, fee)
    before = snapshot(herder)

    with pytest.raises(error), herder.sessions.begin() as session:
        settlement.raise_bid(session, herder.settings, account(herder, session), job.id,
                             fee, multiplier)

    assert snapshot(herder) == before
    herder.assert_books()


def test_a_running_or_foreign_job_cannot_be_rebid(herder: Herder, alice: str) -> None:
    herder.account("bob", deposit=DEPOSIT)
    job = herder.submit(alice)
    herder.claim(slots=1)
    before = snapshot(herder)

    with herder.sessions.begin() as session:
        with pytest.raises(JobNotQueued):
            settlement.raise_bid(session, herder.settings, account(herder, session), job.id,
                                 None, 3)
        with pytest.raises(UnknownJob):
            settlement.raise_bid(session, herder.settings, account(herder, session, "bob"),
                                 job.id, None, 3)

    assert snapshot(herder) == before
    herder.assert_books()


# --- races between endings ---------------------------------------------------


def test_a_cancel_racing_a_claim_ends_the_job_one_way_only(herder: Herder, alice: str) -> None:
    jobs = [herder.submit(alice, now=T0 + i).id for i in range(6)]

    def act(i: int) -> Any:
        if i % 2:
            return herder.claim(slots=6)
        with herder.sessions.begin() as session:
            return settlement.cancel(session, account(herder, session), jobs[i // 2], T0).id

    results = run_together(12, act)

    claimed = {j for r in results if isinstance(r, list) for j in r}
    cancelled = {r for r in results if isinstance(r, str)}
    refused = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, JobNotQueued) for r in refused), refused
    assert not claimed & cancelled
    for job_id in jobs:
        state = herder.job(job_id).state
        assert state == (CANCELLED if job_id in cancelled else RUNNING if job_id in claimed else QUEUED)
    herder.assert_books()


def test_a_result_racing_the_lease_reaper_settles_or_retries_never_both(
    herder: Herder, alice: str
) -> None:
    jobs = [herder.submit(alice, now=T0 + i, max_tokens=32).id for i in range(4)]
    herder.claim(slots=4, now=T0)
    docs = [herder.result(job_id, TEXT) for job_id in jobs]
    late = T0 + herder.settings.lease_s + 1

    def act(i: int) -> Any:
        if i == len(docs):
            with herder.sessions.begin() as session:
                return settlement.reap_leases(session, herder.settings, late)
        return settle(herder, docs[i], now=late)

    results = run_together(len(docs) + 1, act)

    assert not any(isinstance(r, Exception) for r in results), results
    for job_id, settled in zip(jobs, results):
        row = herder.job(job_id)
        assert row.state == (DONE if settled is not None else QUEUED)
    herder.assert_books()


# --- the response -------------------------------------------------------------


def test_the_response_reports_how_the_job_ended(herder: Herder, alice: str) -> None:
    done = herder.submit(alice, reference="mine", max_tokens=32)
    failed = herder.submit(alice)
    herder.claim(slots=2)
    settle(herder, herder.result(done.id, TEXT, timings={"generation_s": 0.5}))
    fail(herder, herder.job(failed.id).task_id, retryable=False)

    ok = views.response(herder.job(done.id))
    assert {k: ok[k] for k in ("job_id", "reference", "status", "text", "attempts", "timings")} == {
        "job_id": done.id, "reference": "mine", "status": DONE, "text": TEXT, "attempts": 1,
        "timings": {"generation_s": 0.5}}
    assert ok["charged"] + ok["refunded"] == ok["offered"] == done.offered
    bad = views.response(herder.job(failed.id))
    assert (bad["status"], bad["error"], bad["charged"], bad["refunded"], bad["text"]) == (
        FAILED, "WorkerLost", 0, failed.offered, None)


def test_a_price_change_applies_to_new_work_not_to_jobs_already_quoted(
    herder: Herder, alice: str
) -> None:
    job = herder.submit(alice, max_tokens=32)  # quoted at 5 + 2/token
    herder.claim(slots=1)
    herder.configure(base_fee=50, fee_per_token=20)  # the operator's SetPromptFee / FeePerToken

    row = settle(herder, herder.result(job.id, TEXT))

    actual = fees.quote(5, 2, job.prompt_tokens, herder.counter.completion_tokens("smollm2", TEXT))
    assert row is not None and (row.charged, row.refunded) == (actual, job.offered - actual)
    assert herder.submit(alice, max_tokens=32).quote == fees.quote(50, 20, job.prompt_tokens, 32)
    herder.assert_books()


def test_concurrent_ticks_end_each_job_once(herder: Herder, alice: str) -> None:
    herder.configure(max_attempts=1)
    expiring = [herder.submit(alice, now=T0, deadline_s=5).id for _ in range(4)]
    for i in range(4):
        herder.submit(alice, now=T0 + i)
    leased = herder.claim(slots=4, now=T0)  # equal bids, arrival order: the expiring ones
    assert leased == expiring
    for _ in range(4):
        herder.submit(alice, now=T0, deadline_s=5)
    late = T0 + herder.settings.lease_s + 1

    def tick(i: int) -> list[str]:
        with herder.sessions.begin() as session:
            ended = settlement.expire_deadlines(session, late) + settlement.reap_leases(
                session, herder.settings, late)
            return [row.id for row in ended]

    results = run_together(6, tick)

    assert not any(isinstance(r, Exception) for r in results), results
    ended = [job_id for r in results for job_id in r]
    assert len(ended) == len(set(ended)) == 8
    assert sorted(herder.job(j).state for j in ended) == [EXPIRED] * 4 + [FAILED] * 4
    herder.assert_books()


# --- several completions, cached prompt tokens, logprobs ------------------------

OTHER = "Alpacas are smaller."


def choice(index: int, text: str, finish: str = "stop", **extra: Any) -> dict[str, Any]:
    """One completion of a worker's result document (``Herder.result`` counts its tokens unless given)."""
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None, **extra}


def test_n_completions_are_each_counted_and_cached_prompt_tokens_cost_their_own_fee(
    herder: Herder, alice: str
) -> None:
    herder.configure(base_fee=5, fee_per_token=3, fee_per_cached_token=1)
    job = herder.submit(alice, max_tokens=32, n=3, prompt="Tell me about the llamas of the high Andes.")
    assert job.prompt_tokens > 4 and job.quote == 5 + 3 * (job.prompt_tokens + 3 * 32)
    herder.claim(slots=1)
    tokens = [herder.counter.completion_tokens("smollm2", t) for t in (TEXT, OTHER)]

    row = settle(herder, herder.result(job.id, TEXT, completion_tokens=1, cached_tokens=4, choices=[
        choice(0, TEXT), choice(1, OTHER, "length"), choice(2, "")]))

    assert row is not None and row.state == DONE
    completion = tokens[0] + tokens[1]
    cost = 5 + 3 * (job.prompt_tokens - 4 + completion) + 1 * 4
    assert (row.completion_tokens, row.cached_tokens, row.charged, row.refunded) == (
        completion, 4, cost, job.offered - cost)
    assert herder.transfers(job.id) == [("hold", job.offered), ("capture", cost), ("release", job.offered - cost)]
    response = views.response(herder.job(job.id))
    assert (response["text"], response["finish_reason"], response["cached_tokens"]) == (TEXT, "stop", 4)
    assert response["choices"] == [
        {"index": 0, "text": TEXT, "finish_reason": "stop", "completion_tokens": tokens[0], "logprobs": None},
        {"index": 1, "text": OTHER, "finish_reason": "length", "completion_tokens": tokens[1], "logprobs": None},
        {"index": 2, "text": "", "finish_reason": "stop", "completion_tokens": 0, "logprobs": None},
    ]
    herder.assert_books()


def test_a_multiplier_applies_to_the_discounted_cost(herder: Herder, alice: str) -> None:
    herder.configure(base_fee=10, fee_per_token=4, fee_per_cached_token=0)
    job = herder.submit(alice, max_tokens=16, n=2, multiplier="1.5")
    herder.claim(slots=1)

    row = settle(herder, herder.result(job.id, TEXT, cached_tokens=job.prompt_tokens,
                                       choices=[choice(0, TEXT), choice(1, TEXT)]))

    completion = 2 * herder.counter.completion_tokens("smollm2", TEXT)
    cost = 10 + 4 * completion  # the whole prompt was cached, at 0
    assert job.offered == -(-3 * job.quote // 2)
    assert row is not None and row.charged == job.offered * cost // job.quote
    herder.assert_books()


@pytest.mark.parametrize(("reported", "kept"), [
    (-3, 0), ("PROMPT+1", "PROMPT"), (10**9, "PROMPT"), (True, 0), (2.0, 0), (None, 0), ("5", 0)])
def test_the_workers_cached_tokens_are_clamped_to_the_prompt(
    herder: Herder, alice: str, reported: Any, kept: Any
) -> None:
    herder.configure(fee_per_cached_token=0)
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)
    values = {"PROMPT": job.prompt_tokens, "PROMPT+1": job.prompt_tokens + 1}
    reported, kept = values.get(reported, reported), values.get(kept, kept)

    row = settle(herder, herder.result(job.id, TEXT, cached_tokens=reported))

    completion = herder.counter.completion_tokens("smollm2", TEXT)
    assert row is not None and row.cached_tokens == kept
    assert row.charged == 5 + 2 * (job.prompt_tokens - kept + completion)
    herder.assert_books()


def test_the_cached_token_fee_is_the_one_quoted_not_the_one_in_force_at_settlement(
    herder: Herder, alice: str
) -> None:
    herder.configure(fee_per_cached_token=1)
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)
    herder.configure(fee_per_cached_token=0, fee_per_token=1)  # repriced while the job ran

    row = settle(herder, herder.result(job.id, TEXT, cached_tokens=3))

    completion = herder.counter.completion_tokens("smollm2", TEXT)
    assert row is not None and row.charged == 5 + 2 * (job.prompt_tokens - 3 + completion) + 1 * 3
    herder.assert_books()


def test_a_job_quoted_before_cached_fees_existed_pays_full_price_for_cached_tokens(
    herder: Herder, alice: str
) -> None:
    herder.configure(fee_per_cached_token=0)
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)
    with herder.sessions.begin() as session:  # as migration 0004 leaves a job admitted before it
        session.get(JobRow, job.seq).fee_per_cached_token = None  # type: ignore[union-attr]

    row = settle(herder, herder.result(job.id, TEXT, cached_tokens=3))

    completion = herder.counter.completion_tokens("smollm2", TEXT)
    assert row is not None and row.charged == fees.quote(5, 2, job.prompt_tokens, completion)
    herder.assert_books()


def test_a_result_without_choices_settles_as_one_empty_choice_and_nothing_cached(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=32)
    herder.claim(slots=1)
    doc = herder.result(job.id, TEXT, prompt_tokens=job.prompt_tokens, completion_tokens=9)
    del doc["choices"]
    # Text anywhere but in choices is not a completion: the worker's result has one shape.
    doc |= {"text": TEXT, "finish_reason": "length"}

    row = settle(herder, herder.sign(doc))

    assert row is not None and (row.charged, row.cached_tokens) == (fees.quote(5, 2, job.prompt_tokens, 0), 0)
    response = views.response(herder.job(job.id))
    assert (response["text"], response["finish_reason"], response["cached_tokens"]) == ("", "stop", 0)
    assert response["choices"] == [{"index": 0, "text": "", "finish_reason": "stop",
                                    "completion_tokens": 0, "logprobs": None}]
    herder.assert_books()


def test_migration_0007_keeps_each_completion_once_in_choices(ledger_url: str) -> None:
    """A job settled before choices were stored (its text in ``result_text`` only) gets its one choice."""
    upgrade(ledger_url, "0006")
    engine = make_engine(ledger_url)
    job = ("INSERT INTO jobs (id, account_id, request_hash, model, request, prompt_tokens, max_tokens, quote, "
           "offered, bid_ppm, priority, state, created_at, result_text, finish_reason, completion_tokens, choices) "
           "VALUES (:id, :account, 'h', 'smollm2', '{}', 3, 8, 10, 10, 1000000, 1.0, :state, 0.0, :text, :finish, "
           ":tokens, :choices)")
    settled = [{"index": 0, "text": "new", "finish_reason": "stop", "completion_tokens": 1, "logprobs": None}]
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO accounts (name, kind, api_key_hash, webhook_secret, balance) "
                           "VALUES ('alice', 'user', 'h', 's', 0)"))
            account = c.execute(text("SELECT id FROM accounts WHERE name = 'alice'")).scalar()
            for row in (dict(id="old", state="done", text="Baa.", finish="length", tokens=2, choices=None),
                        dict(id="new", state="done", text="new", finish="stop", tokens=1, choices=json.dumps(settled)),
                        dict(id="failed", state="failed", text=None, finish=None, tokens=None, choices=None)):
                c.execute(text(job), row | {"account": account})

        upgrade(ledger_url)

        with engine.connect() as c:
            assert not {"result_text", "finish_reason"} & {col["name"] for col in inspect(c).get_columns("jobs")}
            stored = dict(c.execute(text("SELECT id, choices FROM jobs")).all())
        assert json.loads(stored["old"]) == [{"index": 0, "text": "Baa.", "finish_reason": "length",
                                              "completion_tokens": 2, "logprobs": None}]
        assert json.loads(stored["new"]) == settled
        assert stored["failed"] is None

        command.downgrade(alembic_config(ledger_url), "0006")
        with engine.connect() as c:
            back = {r[0]: r[1:] for r in c.execute(text("SELECT id, result_text, finish_reason FROM jobs"))}
        assert back == {"old": ("Baa.", "length"), "new": ("new", "stop"), "failed": (None, None)}
    finally:
        engine.dispose()


def test_a_worker_that_returns_more_choices_than_asked_is_paid_for_those_asked(
    herder: Herder, alice: str
) -> None:
    job = herder.submit(alice, max_tokens=32, n=2)
    herder.claim(slots=1)

    row = settle(herder, herder.result(job.id, TEXT, choices=[choice(i, TEXT * (i + 1)) for i in range(4)]))

    counted = [herder.counter.completion_tokens("smollm2", TEXT * k) for k in (1, 2)]
    assert row is not None and row.completion_tokens == sum(counted)
    assert [c["text"] for c in views.response(row)["choices"]] == [TEXT, TEXT * 2]
    herder.assert_books()


def test_every_completion_that_overruns_is_still_capped_at_the_hold(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=2, n=3)
    herder.claim(slots=1)

    row = settle(herder, herder.result(job.id, TEXT, choices=[choice(i, TEXT * 3) for i in range(3)]))

    assert row is not None and (row.charged, row.refunded) == (job.offered, 0)
    assert herder.transfers(job.id) == [("hold", job.offered), ("capture", job.offered)]
    herder.assert_books()


def test_a_redelivered_result_of_n_completions_charges_once(herder: Herder, alice: str) -> None:
    herder.configure(fee_per_cached_token=1)
    job = herder.submit(alice, max_tokens=32, n=2)
    herder.claim(slots=1)
    doc = herder.result(job.id, TEXT, cached_tokens=2, choices=[choice(0, TEXT), choice(1, OTHER)])
    first = settle(herder, doc)
    assert first is not None
    after_first = snapshot(herder)

    assert settle(herder, doc) is None
    assert settle(herder, doc | {"cached_tokens": 0, "choices": [choice(0, TEXT * 9)]}, now=T0 + 3600) is None
    assert run_together(4, lambda i: settle(herder, dict(doc))) == [None] * 4

    assert snapshot(herder) == after_first
    assert [kind for kind, _ in herder.transfers(job.id)] == ["hold", "capture", "release"]
    assert herder.job(job.id).cached_tokens == 2
    herder.assert_books()


def test_logprobs_are_kept_as_asked_and_made_plain_json(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=32, n=2, logprobs=True, top_logprobs=1)
    plain = herder.submit(alice, max_tokens=32)
    herder.claim(slots=3)  # two choices hold two slots
    entry = {"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
             "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                              {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]}]}
    ruled_out = {"token": "é", "logprob": float("-inf"), "bytes": "junk", "top_logprobs": []}
    logprobs = [entry, ruled_out]

    settle(herder, herder.result(job.id, "Hi", choices=[choice(0, "Hi", logprobs=logprobs),
                                                        choice(1, "Hi", logprobs=None)]))
    settle(herder, herder.result(plain.id, "Hi", choices=[choice(0, "Hi", logprobs=logprobs)]))

    asked = views.response(herder.job(job.id))["choices"]
    assert asked[0]["logprobs"] == [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}]},  # one alternative, as asked
        {"token": "é", "logprob": -9999.0, "bytes": [195, 169], "top_logprobs": []},  # -inf is not JSON
    ]
    assert asked[1]["logprobs"] is None  # the worker sent none for this one
    assert views.response(herder.job(plain.id))["choices"][0]["logprobs"] is None  # not asked for
    herder.assert_books()


@pytest.mark.parametrize(("choices", "texts"), [
    ("not a list", [""]),  # no choices: one empty one
    ([], [""]),
    ([None, {"text": None}], ["", ""]),
    ([{"text": OTHER, "logprobs": [None, {"logprob": 10**400, "bytes": [256], "top_logprobs": "x"}]}], [OTHER]),
])
def test_a_malformed_result_still_settles_on_what_can_be_read(
    herder: Herder, alice: str, choices: Any, texts: list[str]
) -> None:
    job = herder.submit(alice, max_tokens=32, n=2, logprobs=True, top_logprobs=2)
    herder.claim(slots=1)

    row = settle(herder, herder.result(job.id, TEXT, choices=choices, cached_tokens=[1]))

    assert row is not None and row.state == DONE and row.cached_tokens == 0
    completion = sum(herder.counter.completion_tokens("smollm2", t) for t in texts)
    assert (row.completion_tokens, row.charged) == (completion, fees.quote(5, 2, job.prompt_tokens, completion))
    stored = views.response(row)["choices"]
    assert [c["text"] for c in stored] == texts
    if texts == [OTHER]:
        assert stored[0]["logprobs"] == [
            {"token": "", "logprob": -9999.0, "bytes": [], "top_logprobs": []},
            {"token": "", "logprob": -9999.0, "bytes": [], "top_logprobs": []}]
    herder.assert_books()


def test_choices_are_kept_in_the_order_of_their_index(herder: Herder, alice: str) -> None:
    job = herder.submit(alice, max_tokens=32, n=3)
    herder.claim(slots=1)

    row = settle(herder, herder.result(job.id, TEXT, choices=[choice(2, "two"), choice(0, "zero"), choice(1, "one")]))

    assert row is not None and views.response(row)["text"] == "zero"
    assert [(c["index"], c["text"]) for c in views.response(row)["choices"]] == [
        (0, "zero"), (1, "one"), (2, "two")]
    herder.assert_books()


def test_a_generation_its_time_limit_cut_short_is_charged_for_what_it_made_and_answers_a_typed_error(
    herder: Herder, alice: str
) -> None:
    # Its text was streamed as it was made: a full refund would be work for free.
    job = herder.submit(alice, max_tokens=64)
    herder.claim(slots=1)
    row = settle(herder, herder.result(job.id, TEXT, finish_reason="time_limit"))

    completion = herder.counter.completion_tokens("smollm2", TEXT)
    assert row is not None and row.state == FAILED and row.error == "GenerationTimedOut"
    assert row.charged == fees.quote(5, 2, job.prompt_tokens, completion) and row.charged > 0
    assert row.refunded == job.offered - row.charged
    response = views.response(row)
    assert response["status"] == FAILED and response["text"] == TEXT and response["finish_reason"] == "time_limit"
    assert f"{completion} completion tokens" in response["message"]
    # Settled once: the same result again changes nothing.
    before = snapshot(herder)
    assert settle(herder, herder.result(job.id, TEXT, finish_reason="time_limit")) is None
    assert snapshot(herder) == before
    herder.assert_books()


def test_a_result_naming_another_model_id_is_never_settled_and_a_receipt_vouches_only_for_the_registrys(
    herder: Herder, alice: str
) -> None:
    # Anyone who can write a result could claim any model: the receipt would vouch for it.
    job = herder.submit(alice, max_tokens=16)
    herder.claim(slots=1)
    before = snapshot(herder)
    assert settle(herder, herder.result(job.id, TEXT, model_id="forged")) is None
    assert snapshot(herder) == before and herder.job(job.id).state == RUNNING
    real = herder.counter.model_id("smollm2")
    row = settle(herder, herder.result(job.id, TEXT, model_id=real))
    assert row is not None and row.state == DONE and row.model_id == real
    herder.assert_books()
