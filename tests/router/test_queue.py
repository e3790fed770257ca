"""The fee market: best bid first, arrival among equals, aging, and never past the free slots."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from llama_tasks import signing
from router.core import dispatch, queue, settlement
from router.core.models import EXPIRED, QUEUED, RUNNING, JobRow

from .conftest import T0, TWIN_MODEL, Herder, run_together

DEPOSIT = 100_000


def finish(herder: Herder, job_id: str, now: float = T0) -> None:
    """Settle a running job, freeing its slot."""
    assert herder.settle(herder.result(job_id, "Done."), now) is not None


def running(herder: Herder, model: str = "smollm2") -> int:
    with herder.sessions() as session:
        return queue.running_count(session, model)


def test_one_free_slot_takes_the_best_bid_first(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    by_bid = {m: herder.submit(key, now=T0 + i, multiplier=m).id
              for i, m in enumerate(["1.0", "2.0", "1.5"])}

    order = []
    for _ in by_bid:
        (job_id,) = herder.claim(slots=1)
        assert herder.claim(slots=1) == []  # the one slot is taken until the job ends
        order.append(job_id)
        finish(herder, job_id)

    assert order == [by_bid["2.0"], by_bid["1.5"], by_bid["1.0"]]
    herder.assert_books()


def test_equal_bids_go_in_arrival_order(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    quote = herder.quote(prompt="Say hello.", max_tokens=8)
    # The same bid reached four ways, all at the same instant: only arrival separates them.
    arrived = [herder.submit(key, now=T0, **offer).id
               for offer in ({}, {"multiplier": 1}, {"fee": quote}, {"multiplier": "1.000"})]

    claimed = [herder.claim(slots=n)[0] for n in range(1, 5)]

    assert claimed == arrived
    herder.assert_books()


@pytest.mark.parametrize(
    ("aging_per_s", "gap_s", "first"),
    [
        (0.0, 10_000, "new"),  # no aging: the higher bid always wins
        (0.01, 10, "new"),  # 10 s of aging adds 0.1, short of the 0.5 gap in bids
        (0.01, 49, "new"),
        (0.01, 51, "old"),  # 51 s adds 0.51: the old low bid now outranks the new high one
        (0.01, 3600, "old"),
    ],
)
def test_aging_lets_an_old_low_bid_outrank_a_newer_higher_one(
    herder: Herder, aging_per_s: float, gap_s: float, first: str
) -> None:
    herder.configure(aging_per_s=aging_per_s, base_fee=10)  # an even quote: 1.5 × it is exact
    key = herder.account("alice", deposit=DEPOSIT)
    jobs = {"old": herder.submit(key, now=T0, multiplier="1.0").id,
            "new": herder.submit(key, now=T0 + gap_s, multiplier="1.5").id}

    assert [herder.job(j).bid_ppm for j in jobs.values()] == [1_000_000, 1_500_000]

    # The ranking holds whenever the dispatcher looks: it is time-invariant.
    (claimed,) = herder.claim(slots=1, now=T0 + gap_s + 1_000)

    assert claimed == jobs[first]


def test_claims_never_exceed_the_free_slots(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    for i in range(5):
        herder.submit(key, now=T0 + i)
    twin = herder.submit(key, now=T0, model=TWIN_MODEL).id

    first = herder.claim(slots=2)
    assert len(first) == 2 and running(herder) == 2
    assert herder.claim(slots=2) == []
    assert herder.claim(slots=1) == []  # fewer slots than running: none free, none taken
    assert len(herder.claim(slots=3)) == 1 and running(herder) == 3
    # Slots are per model: the twin's one slot is free although smollm2 is full.
    assert herder.claim(slots=1, model=TWIN_MODEL) == [twin]

    finish(herder, first[0])
    assert len(herder.claim(slots=3)) == 1
    assert running(herder) == 3
    with herder.sessions() as session:
        assert session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED)) == 1
    herder.assert_books()


def test_a_claim_marks_each_job_with_a_fresh_attempt_and_lease(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    job_id = herder.submit(key).id

    herder.claim(slots=1, now=T0 + 7)

    row = herder.job(job_id)
    assert (row.state, row.attempt, row.dispatched_at) == (RUNNING, 1, T0 + 7)
    assert row.lease_until == T0 + 7 + herder.settings.lease_s
    assert row.task_id is not None


def test_a_job_past_its_deadline_is_never_dispatched(herder: Herder) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    late = herder.submit(key, now=T0, deadline_s=5, multiplier=3).id
    on_time = herder.submit(key, now=T0, deadline_s=60).id

    # The tick that would expire it has not run yet; the dispatcher must not send it.
    assert herder.claim(slots=2, now=T0 + 10) == [on_time]

    with herder.sessions.begin() as session:
        assert [r.id for r in settlement.expire_deadlines(session, T0 + 10)] == [late]
    assert herder.job(late).state == EXPIRED
    herder.assert_books()


@pytest.mark.parametrize("claimers", [2, 10])
def test_concurrent_claimers_never_share_a_job_nor_exceed_capacity(
    herder: Herder, claimers: int
) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    for i in range(12):
        herder.submit(key, now=T0 + i)

    claimed = run_together(claimers, lambda i: herder.claim(slots=4))

    assert not any(isinstance(c, Exception) for c in claimed), claimed
    ids = [job_id for batch in claimed for job_id in batch]
    assert len(ids) == 4 and len(set(ids)) == 4
    assert running(herder) == 4
    herder.assert_books()


def test_concurrent_claimers_with_different_views_of_the_herd_stay_within_the_largest(
    herder: Herder,
) -> None:
    key = herder.account("alice", deposit=DEPOSIT)
    for i in range(20):
        herder.submit(key, now=T0 + i)

    # Heartbeats arrive at different times, so dispatchers may disagree on slots.
    claimed = run_together(8, lambda i: herder.claim(slots=i + 1))

    assert not any(isinstance(c, Exception) for c in claimed), claimed
    ids = Counter(job_id for batch in claimed for job_id in batch)
    assert all(n == 1 for n in ids.values())
    assert len(ids) == running(herder) <= 8


def test_dispatch_sends_signed_envelopes_only_after_the_claim_commits(herder: Herder) -> None:
    key_pair = Ed25519PrivateKey.generate()
    api_key = herder.account("alice", deposit=DEPOSIT)
    jobs = [herder.submit(api_key, now=T0 + i, multiplier=str(1 + i)).id for i in range(3)]
    twin = herder.submit(api_key, now=T0, model=TWIN_MODEL).id
    sent: list[dict[str, Any]] = []

    def send(row: JobRow, envelope: dict[str, Any]) -> None:
        # Another connection already sees the job running: the claim committed first.
        assert herder.job(row.id).state == RUNNING
        sent.append(signing.verify(envelope, key_pair.public_key()))

    herd = [{"worker": "a", "model": "smollm2", "slots": 1},
            {"worker": "b", "model": "smollm2", "slots": 1},
            {"worker": "c", "model": TWIN_MODEL, "slots": 3}]
    assert dispatch.dispatch(herder.sessions, herder.settings, herd, key_pair, send, T0 + 100) == 3

    assert {p["job_id"] for p in sent} == {jobs[2], jobs[1], twin}
    for payload in sent:
        row = herder.job(payload["job_id"])
        assert (payload["attempt"], payload["model"]) == (1, row.model)
        assert payload["expires_at"] == row.lease_until == T0 + 100 + herder.settings.lease_s
    # Nothing is free any more: a second pass sends nothing.
    assert dispatch.dispatch(herder.sessions, herder.settings, herd, key_pair, send, T0 + 101) == 0
