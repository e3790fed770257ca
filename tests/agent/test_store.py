"""The agent's outcome store on SQLite and PostgreSQL: a tick ends exactly once."""

from __future__ import annotations

import json

from agent.exchange import ActionResponse
from agent.grading import Reading
from agent.store import REQUESTED, SUBMITTING, OutcomeStore
from agent.strategy import BUY, ERROR, SKIP, Verdict


def begin(store: OutcomeStore, tick_id: str, room: str = "lobby", newest: str = "1-0", now: float = 100.0):
    return store.begin(tick_id, room, f"agent:{tick_id}", newest, "{}", now)


def test_recording_a_tick_twice_returns_the_first_record(store: OutcomeStore):
    begin(store, "t1", newest="1-0")
    again = begin(store, "t1", newest="9-0", now=200.0)
    assert (again.newest_message, again.created_at, again.state) == ("1-0", 100.0, SUBMITTING)


def test_a_tick_ends_once_and_a_second_end_is_refused(store: OutcomeStore):
    begin(store, "t1")
    store.requested("t1", "job1", 160)
    assert store.get("t1").state == REQUESTED
    response = {"job_id": "job1", "charged": 150, "text": " positive", "offered": 160}
    filled = ActionResponse("agent:t1", "filled", "", 250, 1_000, 4)
    assert store.finish("t1", Verdict(BUY, 4), 101.0, response, filled)
    assert not store.finish("t1", Verdict(SKIP, 2), 102.0, response)
    tick = store.get("t1")
    assert (tick.state, tick.grade, tick.charged, tick.spent, tick.received) == (BUY, 4, 150, 1_000, 4)


def test_a_response_before_the_admission_is_recorded_still_ends_the_tick(store: OutcomeStore):
    begin(store, "t1")
    assert store.finish("t1", Verdict(SKIP, 2, "low"), 101.0, {"job_id": "job1", "charged": 150})
    store.requested("t1", "job1", 160)  # arrives late: must not reopen the tick
    tick = store.get("t1")
    assert (tick.state, tick.job_id, tick.offered) == (SKIP, "job1", 160)


def test_summary_counts_outcomes_requests_spend_and_duplicates(store: OutcomeStore):
    for i, (verdict, charged) in enumerate([(Verdict(BUY, 4), 10), (Verdict(SKIP, 2), 12), (Verdict(ERROR), 0)]):
        begin(store, f"t{i}", newest=f"{i}-0", now=100.0 + i)
        store.requested(f"t{i}", f"job{i}", 20)
        store.finish(f"t{i}", verdict, 110.0, {"job_id": f"job{i}", "charged": charged},
                     ActionResponse("x", "filled", "", 250, 1_000, 4) if verdict.outcome == BUY else None)
    begin(store, "refused", newest="3-0", now=104.0)
    store.finish("refused", Verdict(ERROR, None, "InsufficientFunds: …"), 110.0)
    begin(store, "open", newest="4-0", now=105.0)
    store.note_duplicate("t0", 10)
    s = store.summary()
    assert (s.buy, s.skip, s.error, s.requests, s.in_flight) == (1, 1, 2, 3, 1)
    assert (s.spend, s.duplicates, s.spent_on_orders, s.bought) == (22, 1, 1_000, 4)
    # A refusal paid nothing, so its messages are graded again; an open tick is in flight.
    assert store.last_graded_id("lobby") == "2-0"
    assert store.in_flight("lobby").id == "open"


def test_a_late_response_keeps_its_charge_on_a_tick_that_timed_out(store: OutcomeStore):
    begin(store, "t1")
    store.requested("t1", "job1", 160)
    assert store.expire_stale(before=200.0, reason="no response within 900s", now=1000.0) == ["t1"]
    store.note_duplicate("t1", 150)
    tick = store.get("t1")
    assert (tick.state, tick.reason, tick.charged) == (ERROR, "no response within 900s", 150)
    assert store.summary().spend == 150


def test_a_probability_grade_is_kept_exactly_beside_its_whole_number(store: OutcomeStore):
    reading = Reading(3.62, "positive", {"positive": 0.5, "negative": 0.2, "neutral": 0.3},
                      {"positive": 0.56, "negative": 0.25, "neutral": 0.19})
    begin(store, "t1")
    store.requested("t1", "job1", 160)
    assert store.finish("t1", Verdict(BUY, 4, reading=reading), 101.0, {"job_id": "job1", "charged": 151},
                        ActionResponse("agent:t1", "filled", "", 250, 1_000, 4))
    assert not store.finish("t1", Verdict(SKIP, 3, reading=reading), 102.0)  # a duplicate adds no second grade
    assert store.get("t1").grade == 4
    grade = store.grade_of("t1")
    assert grade is not None and grade.expected == 3.62
    assert json.loads(grade.probabilities) == {"raw": reading.raw, "calibrated": reading.calibrated}
    assert store.grade_of("nope") is None


def test_cost_per_grade_is_everything_paid_over_the_grades_received(store: OutcomeStore):
    assert store.summary().cost_per_grade is None
    for i, (verdict, charged) in enumerate([(Verdict(SKIP, 2), 150), (Verdict(SKIP, 1), 151),
                                            (Verdict(ERROR, None, "unreadable"), 150)]):
        begin(store, f"t{i}", newest=f"{i}-0", now=100.0 + i)
        store.requested(f"t{i}", f"job{i}", 160)
        store.finish(f"t{i}", verdict, 110.0, {"job_id": f"job{i}", "charged": charged})
    s = store.summary()
    # 451 paid for two grades: an unreadable answer is paid for too.
    assert (s.spend, s.graded, s.cost_per_grade) == (451, 2, 226)
