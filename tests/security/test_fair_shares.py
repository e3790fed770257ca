"""Fair shares, attacked as a tenant with nothing but an API key would (issue item 4).

One account flooded the global queue (``LLAMAS_MAX_QUEUE``) with one-token
requests, locked every other account out, and got their jobs expired and
refunded. Here the flood goes through the real HTTP gateway and herder core
(a real ledger, a real Redis, stub workers that answer at once), and each test
asserts the attack fails and audits the ledger afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from router.core import ledger, limits
from router.core.keys import RATE_PREFIX
from router.core.models import DONE, ESCROW, RUNNING, JobRow
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway.app import create_app
from router.herder import stub
from tests.processes import ROOT
from tests.router.conftest import ledger_url, postgres_url, run_together  # noqa: F401 (fixtures)

#: Slots of the herd's one stub worker.
SLOTS = 8
#: The issue's flood: one-token requests past the global queue bound of 1,000.
FLOOD = 1_030
DEPOSIT = 10_000_000


class Inline(stub.StubTransport):
    """A stub transport whose worker answers as soon as a job is sent: every HTTP request ends by itself."""

    def __init__(self, handles: redis.Redis) -> None:
        super().__init__(handles)
        self.service: HerderService | None = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        super().send(row, envelope)
        if self.service is None or getattr(self._local, "draining", False):
            return  # the drain already running in this thread picks it up
        with self._lock:
            self._local.draining = True
            try:
                self.join(self.service, worker(self.service))
            finally:
                self._local.draining = False


def worker(svc: HerderService) -> stub.StubWorker:
    return stub.scripted_worker(svc.public_key, svc.counter.models())


def build(home: Path, redis_url: str, database_url: str = "", inline: bool = True,
          **overrides: Any) -> tuple[HerderService, stub.StubTransport]:
    """A herder service on ``database_url`` (default: a SQLite file in ``home``) and the session's Redis."""
    settings = HerderSettings(home=home, redis_url=redis_url, database_url=database_url, **overrides)
    handles = redis.Redis.from_url(redis_url)
    transport: stub.StubTransport = Inline(handles) if inline else stub.StubTransport(handles)
    svc = stub.build(settings, transport=transport, slots=SLOTS)
    if isinstance(transport, Inline):
        transport.service = svc
    return svc, transport


def account(svc: HerderService, name: str, deposit: int = DEPOSIT, **own: int) -> str:
    """A funded requester (with its own limits, if given); returns its API key."""
    with svc.sessions.begin() as session:
        created, key = ledger.create_account(session, name, deposit=deposit)
        if own:
            limits.set_own(session, created, **own)
    return key


@pytest.fixture
def forget_windows(r: redis.Redis) -> Iterator[None]:
    """Drop the minute windows this test's accounts made (the session's Redis outlives the test)."""
    yield
    for name in r.scan_iter(RATE_PREFIX + "*"):
        r.delete(name)


@pytest.fixture
def gateway() -> Iterator[Callable[[HerderService], TestClient]]:
    """Opens the real gateway app of a service, each on one event loop for all its requests (its Redis
    client lives there); closed after the test."""
    with ExitStack() as stack:
        yield lambda svc: stack.enter_context(TestClient(create_app(lambda: svc)))


def one_token(**fields: Any) -> dict[str, Any]:
    return {"model": "smollm2", "prompt": "Say a:", "max_tokens": 1, **fields}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def jobs_of(svc: HerderService, name: str) -> list[JobRow]:
    with svc.sessions() as session:
        owner = ledger.account_by_name(session, name)
        return list(session.scalars(select(JobRow).where(JobRow.account_id == owner.id).order_by(JobRow.seq)))


def audit(svc: HerderService) -> None:
    """Nothing lost, nothing charged twice: the books balance, every ended job's hold is settled exactly."""
    with svc.sessions() as session:
        assert ledger.check(session) == []
        open_offers = 0
        for row in session.scalars(select(JobRow)):
            held = ledger.held_for(session, row.id)
            if row.is_open:
                assert held == row.offered
                open_offers += row.offered
            else:
                assert held == 0 and row.charged is not None and row.refunded is not None
                assert row.charged + row.refunded == row.offered
        assert ledger.balance(session, ledger.account_by_name(session, ESCROW)) == open_offers


class Admissions:
    """Counts the service's finished admissions (admitted, or refused), waking a waiter at a count.

    Every HTTP request reaches ``svc.submit_counted`` exactly once, and an admitted
    job is dispatched inside it: once ``k`` have returned or raised, the first
    ``k`` requests are admitted and sent, or refused.
    """

    def __init__(self, svc: HerderService) -> None:
        self._lock, self._done = threading.Lock(), 0
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]] = []
        real = svc.submit_counted

        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return real(*args, **kwargs)
            finally:
                with self._lock:
                    self._done += 1
                    for count, loop, event in self._waiters:
                        if self._done >= count:
                            loop.call_soon_threadsafe(event.set)

        svc.submit_counted = counted  # type: ignore[method-assign]

    async def reach(self, count: int, timeout_s: float = 120.0) -> None:
        event = asyncio.Event()
        with self._lock:
            if self._done >= count:
                return
            self._waiters.append((count, asyncio.get_running_loop(), event))
        with anyio.fail_after(timeout_s):
            await event.wait()


def drain(svc: HerderService, transport: stub.StubTransport) -> None:
    """Run every job sent, and everything each settlement sends next, until nothing is left."""
    transport.join(svc, worker(svc))
    svc.tick()
    transport.join(svc, worker(svc))


def flood_then(app: FastAPI, svc: HerderService, transport: stub.StubTransport, attacker: str, victim: str,
               n: int, body: dict[str, Any]) -> tuple[list[httpx.Response], httpx.Response]:
    """The attacker sends ``n`` requests at once; once each is admitted or refused the victim sends one;
    then the workers run everything. Returns the attacker's replies and the victim's."""

    admissions = Admissions(svc)

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     timeout=None) as http:
            flood = [asyncio.create_task(http.post("/v1/completions", json=body, headers=auth(attacker)))
                     for _ in range(n)]
            await admissions.reach(n)  # every flood request admitted (and sent) or refused
            mine = asyncio.create_task(http.post("/v1/completions", json=body, headers=auth(victim)))
            await admissions.reach(n + 1)  # the victim's request refused, or admitted and sent
            await anyio.to_thread.run_sync(drain, svc, transport)
            return list(await asyncio.gather(*flood)), await mine

    return anyio.run(scenario)


# --- item 4: one account cannot lock everyone out -----------------------------------


def test_a_flood_of_one_account_leaves_another_admitted_and_served(tmp_path: Path, redis_url: str,
                                                                   forget_windows: None) -> None:
    # The defaults: a queue of 1,000, of which one account may fill 100, 4 jobs in flight, 8 slots.
    svc, transport = build(tmp_path, redis_url, inline=False)
    settings = svc.settings
    attacker, victim = account(svc, "attacker"), account(svc, "bystander")
    app = create_app(lambda: svc)

    flood, mine = flood_then(app, svc, transport, attacker, victim, FLOOD, one_token(deadline_s=12))

    statuses = [reply.status_code for reply in flood]
    admitted = settings.account_max_queued + settings.account_max_in_flight
    assert statuses.count(429) == FLOOD - admitted, set(statuses)
    # The attacker's own admitted jobs ran, or (on a machine too slow for their 12 s) expired: its business.
    assert statuses.count(200) + statuses.count(408) == admitted
    refusal = next(reply for reply in flood if reply.status_code == 429)
    assert refusal.json()["error"]["code"] == "AccountQueueFull" and int(refusal.headers["retry-after"]) >= 1
    # The bystander was admitted, ran and was charged like anyone: nothing expired or refunded because of the flood.
    assert mine.status_code == 200, mine.text
    (job,) = jobs_of(svc, "bystander")
    assert job.state == DONE and job.charged and job.charged + (job.refunded or 0) == job.offered
    assert len(jobs_of(svc, "attacker")) == admitted
    audit(svc)


def test_one_account_holds_at_most_its_in_flight_limit_of_the_slots(tmp_path: Path, redis_url: str,
                                                                     forget_windows: None) -> None:
    svc, transport = build(tmp_path, redis_url, inline=False)
    attacker, victim = account(svc, "attacker", in_flight=2), account(svc, "bystander")
    app = create_app(lambda: svc)
    running_at_send: list[int] = []
    send = transport.send

    def counting_send(row: JobRow, envelope: dict[str, Any]) -> None:
        if row.account_id == jobs_of(svc, "attacker")[0].account_id:
            with svc.sessions() as session:
                running_at_send.append(len(list(session.scalars(select(JobRow.id).where(
                    JobRow.account_id == row.account_id, JobRow.state == RUNNING)))))
        send(row, envelope)

    transport.send = counting_send  # type: ignore[method-assign]

    # Ten requests bidding five times the quote: the best bids of the fee market, yet only two run at once.
    flood, mine = flood_then(app, svc, transport, attacker, victim, 10, one_token(multiplier=5))

    assert [reply.status_code for reply in flood] == [200] * 10 and mine.status_code == 200
    assert running_at_send and max(running_at_send) <= 2
    # The bystander's job was sent at once, beside the attacker's first two, not after all ten.
    order = [job_id for job_id, _, _ in transport.sent]
    assert order.index(jobs_of(svc, "bystander")[0].id) <= 2
    audit(svc)


# --- limits through HTTP: headers, 429 + Retry-After, nothing held ------------------


def test_completions_carry_openais_rate_limit_headers(tmp_path: Path, redis_url: str, forget_windows: None,
        gateway: Callable[[HerderService], TestClient]) -> None:
    svc, _ = build(tmp_path, redis_url, account_requests_per_minute=5, account_tokens_per_minute=1000)
    key = account(svc, "tenant")
    http = gateway(svc)

    first = http.post("/v1/completions", json=one_token(max_tokens=4), headers=auth(key))
    streamed = http.post("/v1/chat/completions", headers=auth(key), json={
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})

    assert first.status_code == streamed.status_code == 200
    jobs = jobs_of(svc, "tenant")
    used = [row.prompt_tokens + row.n * row.max_tokens for row in jobs]
    assert first.headers["x-ratelimit-limit-requests"] == "5"
    assert first.headers["x-ratelimit-remaining-requests"] == "4"
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - used[0])
    assert streamed.headers["x-ratelimit-remaining-requests"] == "3"
    assert streamed.headers["x-ratelimit-remaining-tokens"] == str(1000 - sum(used))
    for reply in (first, streamed):
        for kind in ("requests", "tokens"):
            # As OpenAI writes it: "59.5s", or "1m0s" at the moment of the admission itself.
            minutes, _, seconds = reply.headers[f"x-ratelimit-reset-{kind}"].removesuffix("s").rpartition("m")
            assert 0 < int(minutes or 0) * 60 + float(seconds) <= 60
    audit(svc)


def test_a_reference_sent_again_is_not_counted_again_and_its_headers_say_where_the_windows_stand(
        tmp_path: Path, redis_url: str, forget_windows: None,
        gateway: Callable[[HerderService], TestClient]) -> None:
    # The first admission's headers come from the count it made; the same reference sent again counts
    # nothing, so its headers are read from the windows as they stand.
    svc, _ = build(tmp_path, redis_url, account_requests_per_minute=5, account_tokens_per_minute=1000)
    key = account(svc, "tenant")
    http = gateway(svc)
    reads: list[str] = []
    read = svc.rate_limits

    def counted_read(api_key: str) -> Any:
        reads.append(api_key)
        return read(api_key)

    svc.rate_limits = counted_read  # type: ignore[method-assign]

    first = http.post("/v1/completions", json=one_token(max_tokens=4, reference="once"), headers=auth(key))
    assert reads == []  # a new job's headers come from its admission's own count
    again = http.post("/v1/completions", json=one_token(max_tokens=4, reference="once"), headers=auth(key))
    assert reads == [key]  # nothing was counted for it: the windows are read
    other = http.post("/v1/completions", json=one_token(max_tokens=4), headers=auth(key))

    assert first.status_code == again.status_code == other.status_code == 200
    assert reads == [key]
    jobs = jobs_of(svc, "tenant")
    assert len(jobs) == 2
    used = [row.prompt_tokens + row.n * row.max_tokens for row in jobs]
    assert first.headers["x-ratelimit-remaining-requests"] == again.headers["x-ratelimit-remaining-requests"] == "4"
    assert again.headers["x-ratelimit-remaining-tokens"] == str(1000 - used[0])
    assert other.headers["x-ratelimit-remaining-requests"] == "3"
    assert other.headers["x-ratelimit-remaining-tokens"] == str(1000 - sum(used))
    audit(svc)


def test_past_its_requests_per_minute_an_account_gets_429_with_retry_after_and_nothing_held(
        tmp_path: Path, redis_url: str, r: redis.Redis, forget_windows: None,
        gateway: Callable[[HerderService], TestClient]) -> None:
    svc, _ = build(tmp_path, redis_url)
    key = account(svc, "tenant", requests_per_minute=3)
    other = account(svc, "other")
    http = gateway(svc)
    for _ in range(3):
        assert http.post("/v1/completions", json=one_token(), headers=auth(key)).status_code == 200
    balance = _balance(svc, "tenant")

    refused = http.post("/v1/completions", json=one_token(), headers=auth(key))

    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["code"], error["type"], error["limit"]) == ("RateLimited", "rate_limit_exceeded",
                                                              "requests per minute")
    assert 1 <= int(refused.headers["retry-after"]) <= 60 and error["retry_after_s"] == int(refused.headers["retry-after"])
    assert _balance(svc, "tenant") == balance and len(jobs_of(svc, "tenant")) == 3
    with svc.sessions() as session:
        window = limits.window_id(ledger.account_by_name(session, "tenant"))
    assert r.zcard(limits.window_keys(window)[0]) == 3  # the refusal took no place in the window
    # Another account is not limited by this one's window.
    assert http.post("/v1/completions", json=one_token(), headers=auth(other)).status_code == 200
    audit(svc)


def test_tokens_per_minute_and_n_times_max_tokens_are_enforced_with_nothing_held(
        tmp_path: Path, redis_url: str, forget_windows: None,
        gateway: Callable[[HerderService], TestClient]) -> None:
    svc, _ = build(tmp_path, redis_url, account_max_request_tokens=16)
    key = account(svc, "tenant", tokens_per_minute=60)
    http = gateway(svc)

    too_much_work = http.post("/v1/completions", json=one_token(max_tokens=9, n=2), headers=auth(key))
    over_the_rate = http.post("/v1/completions", json=one_token(max_tokens=16, prompt="word " * 50),
                              headers=auth(key))
    assert too_much_work.status_code == 422 and too_much_work.json()["error"]["code"] == "OverRequestLimit"
    assert over_the_rate.status_code == 422 and over_the_rate.json()["error"]["limit"] == "tokens per minute"
    assert _balance(svc, "tenant") == DEPOSIT and jobs_of(svc, "tenant") == []

    replies = [http.post("/v1/completions", json=one_token(max_tokens=16), headers=auth(key)) for _ in range(4)]
    statuses = [reply.status_code for reply in replies]
    per_request = jobs_of(svc, "tenant")[0].prompt_tokens + 16
    assert statuses.count(200) == 60 // per_request and statuses[-1] == 429
    assert replies[-1].json()["error"]["limit"] == "tokens per minute" and "retry-after" in replies[-1].headers
    audit(svc)


def _balance(svc: HerderService, name: str) -> int:
    with svc.sessions() as session:
        return ledger.balance(session, ledger.account_by_name(session, name))


# --- several herders and gateways, one ledger, one Redis -----------------------------


def test_two_gateways_on_one_ledger_and_redis_enforce_one_requests_per_minute(
        tmp_path: Path, redis_url: str, ledger_url: str, forget_windows: None,  # noqa: F811
        gateway: Callable[[HerderService], TestClient]) -> None:
    first, _ = build(tmp_path / "a", redis_url, ledger_url)
    second, _ = build(tmp_path / "b", redis_url, ledger_url)
    key = account(first, "tenant", requests_per_minute=6)
    gateways = [gateway(first), gateway(second)]

    statuses = run_together(20, lambda i: gateways[i % 2].post(
        "/v1/completions", json=one_token(), headers=auth(key)).status_code)

    assert sorted(statuses) == [200] * 6 + [429] * 14
    assert len(jobs_of(first, "tenant")) == 6
    audit(first)


def test_two_herder_services_on_one_ledger_enforce_one_queue_share(
        tmp_path: Path, redis_url: str, ledger_url: str, forget_windows: None) -> None:  # noqa: F811
    first, _ = build(tmp_path / "a", redis_url, ledger_url, inline=False)
    second, _ = build(tmp_path / "b", redis_url, ledger_url, inline=False)
    key = account(first, "tenant", queued=5, in_flight=1)

    def submit(i: int) -> str:
        (first if i % 2 else second).submit(key, Submission(prompt="Say a:", max_tokens=1))
        return "admitted"

    outcomes = [o if isinstance(o, str) else type(o).__name__ for o in run_together(16, submit)]

    # One started at once (its in-flight limit), five wait: the rest refused, across both services.
    assert sorted(outcomes) == ["AccountQueueFull"] * 10 + ["admitted"] * 6
    states = [row.state for row in jobs_of(first, "tenant")]
    assert states.count(RUNNING) == 1 and states.count("queued") == 5
    audit(first)


# --- the admin's command ------------------------------------------------------------------


def llamas(home: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LLAMAS_HOME=str(home), LLAMAS_REDIS_URL=redis_url, LLAMAS_DATABASE_URL="",
               COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_admin_sets_shows_and_clears_an_accounts_limits(tmp_path: Path, redis_url: str,
                                                            forget_windows: None,
        gateway: Callable[[HerderService], TestClient]) -> None:
    svc, _ = build(tmp_path, redis_url)
    key = account(svc, "tenant")

    shown = llamas(tmp_path, redis_url, "accounts", "limits", "tenant", "--queued", "7", "--rpm", "2",
                   "--in-flight", "3")
    assert shown.returncode == 0, shown.stderr
    assert "queued jobs: 7  (set for this account)" in shown.stdout
    assert "requests per minute: 2  (set for this account)" in shown.stdout
    assert f"tokens per minute: {svc.settings.account_tokens_per_minute}  (default)" in shown.stdout

    http = gateway(svc)
    statuses = [http.post("/v1/completions", json=one_token(), headers=auth(key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]

    cleared = llamas(tmp_path, redis_url, "accounts", "limits", "tenant", "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert f"requests per minute: {svc.settings.account_requests_per_minute}  (default)" in cleared.stdout
    bad = llamas(tmp_path, redis_url, "accounts", "limits", "escrow", "--queued", "1")
    assert bad.returncode == 1 and "system account" in bad.stderr
    assert llamas(tmp_path, redis_url, "accounts", "limits", "nobody").returncode == 1
    audit(svc)
