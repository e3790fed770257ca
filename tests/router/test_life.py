"""A request's whole life in one process: the herder's own code on a real
ledger and Redis, with the stub transport instead of Celery (``router.herder.stub``).

Every test submits, drains (``transport.join``), then asserts: no worker
processes, no waiting on time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from llama_tasks import runtime, signing
from llama_tasks.errors import BadGrammar, InvalidRequest
from llama_tasks.placement import place
from llama_tasks.scripted import SCRIPTED_TEXT
from llama_tasks.settings import WorkerSettings
from router.core import ledger
from router.core.errors import InsufficientFee, NoWorkers, UnknownModelRequested
from router.core.models import JobRow
from router.core.request import Submission
from router.core.service import RECONCILE_AFTER_S, HerderService
from router.core.settings import HerderSettings
from router.herder import stub

DEPOSIT = 100_000


class Clock:
    """Time the test moves by hand (from now: workers check envelopes' expiry against real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def life(tmp_path: Path, redis_url: str, ledger_url: str) -> Iterator[tuple[HerderService, stub.StubTransport, str, Clock]]:
    """A herder on a fresh ledger (SQLite, and PostgreSQL where one answers) with two stub slots per model."""
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, max_attempts=2)
    transport, clock = stub.StubTransport(), Clock()
    svc = stub.build(settings, transport=transport, slots=2, clock=clock)
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "requester", DEPOSIT)
    yield svc, transport, key, clock


def scripted(svc: HerderService, text: str = SCRIPTED_TEXT) -> stub.StubWorker:
    return stub.scripted_worker(svc.public_key, svc.counter.models(), text)


def books(svc: HerderService, key: str) -> tuple[int, list[str]]:
    with svc.sessions.begin() as s:
        return ledger.balance(s, ledger.account_by_key(s, key)), ledger.check(s)


def rows(svc: HerderService) -> list[JobRow]:
    with svc.sessions.begin() as s:
        return list(s.scalars(select(JobRow).order_by(JobRow.seq)))


def test_ten_requests_run_settle_and_reach_their_handles(life: Any) -> None:
    svc, transport, key, _ = life
    jobs = [svc.submit(key, Submission(prompt=f"Say hello {i}", max_tokens=16))["job_id"] for i in range(10)]
    # Two slots: two jobs went out at admission, the rest wait for a settlement to free one.
    assert len(transport.sent) == 2

    assert transport.join(svc, scripted(svc)) == 10

    assert set(transport.responses) == set(jobs)
    tokens = svc.counter.completion_tokens("smollm2", SCRIPTED_TEXT)
    charged = 0
    for row in rows(svc):
        response = transport.responses[row.id]
        assert response["status"] == "done" and response["text"] == SCRIPTED_TEXT
        # Recounted by the herder, charged at the quote's prices, the rest of the hold returned.
        assert response["completion_tokens"] == tokens
        assert response["charged"] == 1 + row.prompt_tokens + tokens
        assert response["charged"] + response["refunded"] == row.offered
        charged += response["charged"]
    assert books(svc, key) == (DEPOSIT - charged, [])


def test_a_lost_settle_message_is_settled_by_the_tick_from_the_result_store(life: Any) -> None:
    svc, transport, key, clock = life
    job = svc.submit(key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    transport.run_one(svc, scripted(svc), settle=False)  # the result is stored; its callback never comes
    assert rows(svc)[0].state == "running"

    assert svc.tick()["settled"] == 0  # too soon: the callback may still be on its way
    clock.now += RECONCILE_AFTER_S + 1
    assert svc.tick()["settled"] == 1

    assert transport.responses[job]["status"] == "done"
    # A late callback for the same attempt changes nothing.
    svc.on_result(rows(svc)[0].task_id, transport.stored[rows(svc)[0].task_id].document or {})
    balance, problems = books(svc, key)
    assert problems == [] and balance == DEPOSIT - transport.responses[job]["charged"]


def test_a_failing_worker_is_retried_then_the_job_fails_with_a_full_refund(life: Any) -> None:
    svc, transport, key, _ = life

    def crashing(envelope: dict[str, Any], task_id: str) -> dict[str, Any]:
        raise RuntimeError("the GPU fell off")

    job = svc.submit(key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    assert transport.join(svc, crashing) == 2  # max_attempts=2
    response = transport.responses[job]
    assert (response["status"], response["error"], response["attempts"]) == ("failed", "RuntimeError", 2)
    assert books(svc, key) == (DEPOSIT, [])


def test_a_refused_envelope_is_not_retried(life: Any) -> None:
    svc, transport, key, _ = life

    def refusing(envelope: dict[str, Any], task_id: str) -> dict[str, Any]:
        raise InvalidRequest("the worker cannot run this")

    job = svc.submit(key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    assert transport.join(svc, refusing) == 1
    assert transport.responses[job]["status"] == "failed"
    assert books(svc, key) == (DEPOSIT, [])


def test_a_queued_job_cancelled_is_refunded_and_never_sent(life: Any) -> None:
    svc, transport, key, _ = life
    for i in range(2):
        svc.submit(key, Submission(prompt=f"Take a slot {i}", max_tokens=8))
    waiting = svc.submit(key, Submission(prompt="Wait", max_tokens=8))["job_id"]
    assert svc.cancel(key, waiting)["state"] == "cancelled"

    transport.join(svc, scripted(svc))
    assert waiting not in {job for job, _, _ in transport.sent}
    assert transport.responses[waiting]["status"] == "cancelled"
    assert transport.responses[waiting]["refunded"] == transport.responses[waiting]["offered"]
    assert books(svc, key)[1] == []


def test_a_job_past_its_deadline_expires_on_the_tick_with_a_full_refund(life: Any) -> None:
    svc, transport, key, clock = life
    for i in range(2):
        svc.submit(key, Submission(prompt=f"Take a slot {i}", max_tokens=8))
    late = svc.submit(key, Submission(prompt="In a hurry", max_tokens=8, deadline_s=5))["job_id"]
    clock.now += 10
    svc.tick()
    transport.join(svc, scripted(svc))
    assert transport.responses[late]["status"] == "expired"
    assert transport.responses[late]["refunded"] == transport.responses[late]["offered"]
    assert books(svc, key)[1] == []


def test_an_unserved_model_and_an_unknown_one_are_refused_before_anything_is_held(life: Any) -> None:
    svc, transport, key, _ = life
    unserved = stub.build(svc.settings, transport=transport, herd=stub.StaticHerd([], 1), sessions=svc.sessions,
                          counter=svc.counter)
    with pytest.raises(NoWorkers):
        unserved.submit(key, Submission(prompt="Anyone there?", max_tokens=8))
    with pytest.raises(UnknownModelRequested):
        svc.submit(key, Submission(prompt="Hello", max_tokens=8, model="no-such-model"))
    assert rows(svc) == [] and books(svc, key) == (DEPOSIT, []) and transport.sent == []


def test_with_demand_placement_a_model_a_worker_could_load_is_admitted_to_wait(life: Any) -> None:
    svc, transport, key, _ = life
    settings = svc.settings.model_copy(update={"placement": "demand"})
    spec = svc.counter.models()["smollm2"]
    loader = {"worker": "idle@local", "model": None, "state": "idle", "slots": 2, "busy": 0, "gpus": [],
              "memory_mb": 1000, "can_load": [{"model": "smollm2", "model_id": spec.model_id, "mb": 100}]}
    placeable = stub.StaticHerd([], 1)
    placeable.workers = [loader]
    waiting = stub.build(settings, transport=transport, herd=placeable, sessions=svc.sessions, counter=svc.counter)
    job = waiting.submit(key, Submission(prompt="Anyone there?", max_tokens=8))
    assert job["state"] == "queued" and transport.sent == []  # held, queued, sent to nobody yet
    # A worker whose memory is too small, or that lacks the file, cannot: refused with nothing held.
    for cannot in ({"memory_mb": 50}, {"can_load": [{"model": "smollm2", "model_id": "0" * 64, "mb": 100}]}):
        placeable.workers = [loader | cannot]
        with pytest.raises(NoWorkers):
            waiting.submit(key, Submission(prompt="And now?", max_tokens=8))
    # Without placement, nobody would move a worker: refused as unserved.
    off = stub.build(svc.settings, transport=transport, herd=placeable, sessions=svc.sessions, counter=svc.counter)
    placeable.workers = [loader]
    with pytest.raises(NoWorkers):
        off.submit(key, Submission(prompt="Off?", max_tokens=8))
    assert [r.id for r in rows(svc)] == [job["job_id"]] and books(svc, key)[1] == []


def test_a_retried_reference_gets_its_job_back_even_while_no_worker_serves(life: Any) -> None:
    svc, transport, key, _ = life
    first = svc.submit(key, Submission(prompt="Once", max_tokens=8, reference="r-1"))["job_id"]
    unserved = stub.build(svc.settings, transport=transport, herd=stub.StaticHerd([], 1), sessions=svc.sessions,
                          counter=svc.counter)
    assert unserved.submit(key, Submission(prompt="Once", max_tokens=8, reference="r-1"))["job_id"] == first
    assert len(rows(svc)) == 1


def test_bids_are_served_highest_first_while_the_slots_are_busy(life: Any) -> None:
    svc, transport, key, _ = life
    for i in range(2):
        svc.submit(key, Submission(prompt=f"Take a slot {i}", max_tokens=8))
    jobs = {m: svc.submit(key, Submission(prompt=f"Name a colour ({m}).", max_tokens=4, multiplier=m))["job_id"]
            for m in (1.0, 2.0, 1.5)}
    assert [svc.status(key, jobs[m])["position"] for m in (2.0, 1.5, 1.0)] == [1, 2, 3]

    transport.join(svc, scripted(svc))
    order = [job for job, _, _ in transport.sent]
    assert order.index(jobs[2.0]) < order.index(jobs[1.5]) < order.index(jobs[1.0])
    assert books(svc, key)[1] == []


def test_an_offer_below_the_quote_is_refused_with_the_amount_needed_and_nothing_held(life: Any) -> None:
    svc, transport, key, _ = life
    with pytest.raises(InsufficientFee) as info:
        svc.submit(key, Submission(prompt="Hello there", max_tokens=50, fee=3))
    assert info.value.needed > 3
    assert rows(svc) == [] and books(svc, key) == (DEPOSIT, []) and transport.sent == []


def test_a_grammar_that_does_not_parse_is_refused_before_any_money_moves(life: Any) -> None:
    # It used to be admitted, take a worker's slot, fail there and be refunded.
    svc, transport, key, _ = life
    with pytest.raises(BadGrammar):
        svc.submit(key, Submission(prompt="Pick:", max_tokens=5, grammar="root ::= [1-5"))
    with pytest.raises(BadGrammar):
        svc.submit(key, Submission(prompt="Pick:", max_tokens=5,
                                   json_schema={"type": "object", "properties": {"a": {"$ref": "#/missing"}}}))
    assert rows(svc) == [] and books(svc, key) == (DEPOSIT, []) and transport.sent == []


def test_n_choices_are_each_recounted_and_charged(life: Any) -> None:
    svc, transport, key, _ = life
    job = svc.submit(key, Submission(prompt="Say hello", max_tokens=8, n=3))["job_id"]
    transport.join(svc, scripted(svc, "Hi there."))
    response = transport.responses[job]
    tokens = svc.counter.completion_tokens("smollm2", "Hi there.")
    assert [c["text"] for c in response["choices"]] == ["Hi there."] * 3
    assert response["completion_tokens"] == 3 * tokens
    assert books(svc, key)[1] == []


def test_the_real_model_answers_through_the_workers_own_code(life: Any, tmp_path: Path, redis_url: str) -> None:
    """The worker's ``run_envelope`` (signature, claim, stream, batch engine) on the bundled model, inline."""
    svc, transport, key, _ = life
    signing.write_private(tmp_path / "house.key", stub.HOUSE.key)  # the house key the stub herder checks against
    worker_settings = WorkerSettings(home=tmp_path, redis_url=redis_url, slots=2, n_ctx=512,
                                     public_key=signing.encode_public(svc.public_key))
    ctx = runtime.start_process(worker_settings, place(None, 1), slots=2)
    try:
        job = svc.submit(key, Submission(prompt="Name one animal.", max_tokens=6, temperature=0.0))["job_id"]
        transport.join(svc, lambda env, task_id: runtime.run_envelope(ctx, env, task_id, "inline@test"))
    finally:
        ctx.engine.stop()
    response = transport.responses[job]
    assert response["status"] == "done" and response["worker"] == "inline@test"
    assert 1 <= response["completion_tokens"] <= 6 and response["text"]
    assert books(svc, key)[1] == []
