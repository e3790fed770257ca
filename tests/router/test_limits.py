"""Fair shares (``router.core.limits``): the minute windows on a real Redis, each account's limits on a real
ledger (SQLite and PostgreSQL), the per-account queue share at admission and the in-flight cap at every claim."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from router.core import ledger, limits
from router.core.errors import AccountQueueFull, OverRequestLimit, QueueFull, RateLimited, SystemAccount
from router.core.models import ESCROW, QUEUED, RUNNING, JobRow
from tests.router.conftest import T0, TWIN_MODEL, Herder, run_together

DEPOSIT = 1_000_000
#: Limits used by the window tests: 3 requests and 100 tokens a minute.
SMALL = limits.Limits(queued=10, in_flight=3, requests_per_minute=3, tokens_per_minute=100, request_tokens=50)


@pytest.fixture
def windows(r: redis.Redis) -> limits.Windows:
    return limits.Windows(r)


@pytest.fixture
def window(r: redis.Redis) -> Any:
    """A fresh window id, deleted afterwards (the session's Redis is shared by every test)."""
    name = uuid.uuid4().hex
    yield name
    r.delete(*limits.window_keys(name))


# --- the minute windows ------------------------------------------------------------


def test_requests_per_minute_refuses_the_one_too_many_and_counts_nothing_for_it(
        windows: limits.Windows, window: str, r: redis.Redis) -> None:
    for i in range(3):
        usage = windows.take(window, f"job{i}", 1, SMALL, T0 + i)
        assert usage.remaining_requests == 2 - i
    with pytest.raises(RateLimited) as refused:
        windows.take(window, "job3", 1, SMALL, T0 + 10)
    # The oldest entry (at T0) leaves the window at T0 + 60: 50 s after the refusal.
    assert refused.value.limit == "requests per minute" and refused.value.retry_after_s == 50
    assert r.zcard(limits.window_keys(window)[0]) == 3  # the refusal left no trace
    windows.take(window, "job3", 1, SMALL, T0 + 60.001)  # the first has left the window
    assert windows.usage(window, SMALL, T0 + 60.001).remaining_requests == 0


def test_tokens_per_minute_waits_until_enough_tokens_have_left(windows: limits.Windows, window: str) -> None:
    windows.take(window, "a", 30, SMALL, T0)
    windows.take(window, "b", 40, SMALL, T0 + 20)
    with pytest.raises(RateLimited) as refused:
        windows.take(window, "c", 50, SMALL, T0 + 30)  # 70 + 50 > 100: "a" must leave first (at T0 + 60)
    assert refused.value.limit == "tokens per minute" and refused.value.retry_after_s == 30
    usage = windows.take(window, "c", 30, SMALL, T0 + 30)  # 70 + 30 fits
    assert (usage.remaining_tokens, usage.remaining_requests) == (0, 0)
    with pytest.raises(RateLimited) as refused:
        windows.take(window, "d", 70, SMALL, T0 + 61)  # "a" left: 70 used; "b" must leave too (at T0 + 80)
    assert refused.value.retry_after_s == 19


def test_a_refusal_for_tokens_looks_past_the_first_hundred_entries(windows: limits.Windows, window: str) -> None:
    tokens_only = limits.Limits(queued=1, in_flight=1, requests_per_minute=0, tokens_per_minute=250,
                                request_tokens=250)
    for i in range(250):
        windows.take(window, f"j{i}", 1, tokens_only, T0 + i * 0.1)
    with pytest.raises(RateLimited) as refused:
        windows.take(window, "big", 120, tokens_only, T0 + 30)
    # 120 tokens fit once the 120 oldest have left: the 120th came at T0 + 11.9, so at T0 + 71.9.
    assert refused.value.retry_after_s == 42
    assert windows.usage(window, tokens_only, T0 + 30).remaining_tokens == 0
    assert windows.usage(window, tokens_only, T0 + 71.95).remaining_tokens == 120


def test_no_limit_counts_but_never_refuses(windows: limits.Windows, window: str) -> None:
    free = limits.Limits(queued=1, in_flight=1, requests_per_minute=0, tokens_per_minute=0, request_tokens=1)
    for i in range(20):
        windows.take(window, f"j{i}", 10**6, free, T0)
    assert limits.headers(windows.usage(window, free, T0)) == {}


def test_a_reservation_gives_back_what_a_failed_admission_took(
        windows: limits.Windows, window: str, r: redis.Redis, herder: Herder) -> None:
    key = herder.account("alice", DEPOSIT)
    with herder.sessions() as session:
        account = ledger.account_by_key(session, key)
    with pytest.raises(RuntimeError), limits.reserve(windows) as reservation:
        reservation.take(account, "job1", 10, SMALL, T0)
        assert r.zcard(limits.window_keys(limits.window_id(account))[0]) == 1
        raise RuntimeError("the commit failed")
    assert r.zcard(limits.window_keys(limits.window_id(account))[0]) == 0
    assert windows.usage(limits.window_id(account), SMALL, T0).remaining_tokens == 100  # its tokens too
    with limits.reserve(windows) as reservation:
        reservation.take(account, "job2", 10, SMALL, T0)
    assert r.zcard(limits.window_keys(limits.window_id(account))[0]) == 1  # committed: kept
    r.delete(*limits.window_keys(limits.window_id(account)))


def test_headers_are_openais(windows: limits.Windows, window: str) -> None:
    windows.take(window, "a", 30, SMALL, T0)
    headers = limits.headers(windows.usage(window, SMALL, T0 + 0.5))
    assert headers == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "59.5s",
        "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "70",
        "x-ratelimit-reset-tokens": "59.5s",
    }


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (1.5, "1.5s"), (59.9999, "60s"), (60, "1m0s"), (361, "6m1s")])
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert limits._duration(seconds) == text


def test_the_window_id_is_unique_per_key_and_reveals_nothing(herder: Herder) -> None:
    a, b = herder.account("a", 1), herder.account("b", 1)
    with herder.sessions() as session:
        ids = {limits.window_id(ledger.account_by_key(session, k)) for k in (a, b)}
        hashes = {ledger.account_by_key(session, k).api_key_hash for k in (a, b)}
    assert len(ids) == 2 and not any(i in h for i in ids for h in hashes)


# --- each account's limits ------------------------------------------------------------


def test_an_account_has_the_defaults_until_the_admin_sets_its_own(herder: Herder) -> None:
    herder.account("alice", DEPOSIT)
    with herder.sessions.begin() as session:
        alice = ledger.account_by_name(session, "alice")
        assert limits.of(session, herder.settings, alice.id) == limits.defaults(herder.settings)
        limits.set_own(session, alice, queued=7, requests_per_minute=0)
        limits.set_own(session, alice, in_flight=2)  # adds to what was set
        assert limits.own(session, alice.id) == {"queued": 7, "requests_per_minute": 0, "in_flight": 2}
        mine = limits.of(session, herder.settings, alice.id)
        assert (mine.queued, mine.in_flight, mine.requests_per_minute) == (7, 2, 0)
        assert mine.tokens_per_minute == herder.settings.account_tokens_per_minute
        limits.set_own(session, alice, clear=True, tokens_per_minute=5)
        assert limits.own(session, alice.id) == {"tokens_per_minute": 5}
        limits.set_own(session, alice, clear=True)
        assert limits.of(session, herder.settings, alice.id) == limits.defaults(herder.settings)
        with pytest.raises(SystemAccount):
            limits.set_own(session, ledger.account_by_name(session, ESCROW), queued=1)


def test_n_times_max_tokens_and_a_request_bigger_than_the_token_rate_are_refused() -> None:
    limits.check_request(SMALL, prompt_tokens=40, max_tokens=25, n=2)  # 50 of 50, 90 of 100 tokens
    with pytest.raises(OverRequestLimit) as refused:
        limits.check_request(SMALL, prompt_tokens=1, max_tokens=17, n=3)
    assert (refused.value.requested, refused.value.allowed) == (51, 50)
    with pytest.raises(OverRequestLimit) as refused:
        limits.check_request(SMALL, prompt_tokens=60, max_tokens=50, n=1)
    assert refused.value.limit == "tokens per minute"
    # More choices than the account's slots: each is a sequence holding one.
    with pytest.raises(OverRequestLimit) as refused:
        limits.check_request(SMALL, prompt_tokens=1, max_tokens=1, n=4)
    assert (refused.value.limit, refused.value.requested, refused.value.allowed) == ("n (slots at once)", 4, 3)


def test_admission_refuses_past_the_accounts_share_of_the_queue_with_nothing_held(herder: Herder) -> None:
    herder.configure(account_max_queued=3, max_queue=5)
    alice, bob = herder.account("alice", DEPOSIT), herder.account("bob", DEPOSIT)
    for i in range(3):
        herder.submit(alice, now=T0 + i)
    with pytest.raises(AccountQueueFull) as refused:
        herder.submit(alice, now=T0 + 3)
    assert refused.value.retry_after_s >= 1
    assert herder.balance("alice") == DEPOSIT - 3 * herder.job(herder.jobs()[0].id).offered
    herder.submit(bob)
    herder.submit(bob)
    with pytest.raises(QueueFull):  # the global bound still holds
        herder.submit(bob)
    herder.assert_books()


def test_concurrent_admissions_of_one_account_never_pass_its_queue_share(herder: Herder) -> None:
    herder.configure(account_max_queued=4)
    alice = herder.account("alice", DEPOSIT)
    outcomes = run_together(12, lambda i: herder.submit(alice, now=T0 + i))
    assert sum(isinstance(o, JobRow) for o in outcomes) == 4
    assert all(isinstance(o, (JobRow, AccountQueueFull)) for o in outcomes), outcomes
    herder.assert_books()


def test_a_request_over_the_accounts_n_times_max_tokens_is_refused_with_nothing_held(herder: Herder) -> None:
    herder.configure(account_max_request_tokens=16)
    alice = herder.account("alice", DEPOSIT)
    with pytest.raises(OverRequestLimit):
        herder.submit(alice, max_tokens=9, n=2)
    assert herder.balance("alice") == DEPOSIT and herder.jobs() == []
    with herder.sessions.begin() as session:
        limits.set_own(session, ledger.account_by_name(session, "alice"), request_tokens=18)
    herder.submit(alice, max_tokens=9, n=2)
    herder.assert_books()


# --- the in-flight cap at every claim ---------------------------------------------------


def running_of(herder: Herder, name: str) -> int:
    with herder.sessions() as session:
        account = ledger.account_by_name(session, name)
        return session.scalar(select(func.count()).select_from(JobRow).where(
            JobRow.account_id == account.id, JobRow.state == RUNNING)) or 0


def test_a_claim_passes_over_an_account_at_its_in_flight_limit(herder: Herder) -> None:
    herder.configure(account_max_in_flight=2)
    alice, bob = herder.account("alice", DEPOSIT), herder.account("bob", DEPOSIT)
    early = [herder.submit(alice, now=T0 + i, multiplier=2).id for i in range(5)]  # the better bids
    late = [herder.submit(bob, now=T0 + 10 + i).id for i in range(2)]

    claimed = herder.claim(slots=8)

    assert claimed == early[:2] + late  # alice's other three wait although they bid more
    assert herder.claim(slots=8) == []
    with herder.sessions.begin() as session:
        limits.set_own(session, ledger.account_by_name(session, "alice"), in_flight=3)
    assert herder.claim(slots=8) == [early[2]]
    assert (running_of(herder, "alice"), running_of(herder, "bob")) == (3, 2)
    herder.assert_books()


def test_the_in_flight_limit_counts_every_model(herder: Herder) -> None:
    herder.configure(account_max_in_flight=2)
    alice = herder.account("alice", DEPOSIT)
    for i in range(3):
        herder.submit(alice, now=T0 + i)
        herder.submit(alice, now=T0 + i, model=TWIN_MODEL)
    assert len(herder.claim(slots=4)) == 2
    assert herder.claim(slots=4, model=TWIN_MODEL) == []


def test_concurrent_claims_for_two_models_never_pass_the_in_flight_limit(herder: Herder) -> None:
    herder.configure(account_max_in_flight=3)
    alice = herder.account("alice", DEPOSIT)
    for i in range(6):
        herder.submit(alice, now=T0 + i)
        herder.submit(alice, now=T0 + i, model=TWIN_MODEL)

    claimed = run_together(8, lambda i: herder.claim(slots=4, model=TWIN_MODEL if i % 2 else "smollm2"))

    assert not any(isinstance(c, Exception) for c in claimed), claimed
    assert sum(len(c) for c in claimed) == running_of(herder, "alice") == 3
    with herder.sessions() as session:
        assert session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED)) == 9
    herder.assert_books()
