"""The agent's strategy as pure functions: when to pay for a grade, what a response means."""

from __future__ import annotations

import math

import pytest

from agent import grading, strategy
from agent.strategy import BUY, ERROR, SKIP
from agent.world import ChatMessage

FEWSHOT = grading.method("fewshot")


def chat(*ids: str) -> list[ChatMessage]:
    return [ChatMessage(i, "ana", f"message {i}") for i in ids]


def done(text: str, **extra: object) -> dict[str, object]:
    return {"status": "done", "text": text, "charged": 10, "reference": "agent:t1"} | extra


def test_a_room_is_graded_only_when_something_new_was_said_and_nothing_is_in_flight():
    assert strategy.why_not_grade(chat("1-0", "2-0"), None, None) is None
    assert strategy.why_not_grade(chat("1-0", "2-0"), "1-0", None) is None
    assert strategy.why_not_grade(chat("1-0", "2-0"), "2-0", None) == "nothing new since the last grade"
    assert strategy.why_not_grade([], None, None) == "the room is empty"
    assert "job j1" in (strategy.why_not_grade(chat("1-0"), None, "j1") or "")


def test_above_three_buys_three_and_below_skip():
    assert [strategy.decide(g).outcome for g in (1, 2, 3, 4, 5)] == [SKIP, SKIP, SKIP, BUY, BUY]
    assert strategy.decide(3).reason == "grade 3 is not above 3"


def test_a_positive_answer_buys_and_negative_or_factual_answers_skip():
    assert strategy.judge(done(" positive"), FEWSHOT) == strategy.Verdict(BUY, 4)
    assert strategy.judge(done(" negative"), FEWSHOT).outcome == SKIP
    assert strategy.judge(done(" factual"), FEWSHOT) == strategy.Verdict(SKIP, 3, "grade 3 is not above 3")


def test_an_unreadable_answer_or_a_failed_job_is_an_error_with_its_reason():
    unreadable = strategy.judge(done("maybe"), FEWSHOT)
    assert unreadable.outcome == ERROR and "cannot read the answer 'maybe'" in unreadable.reason
    failed = strategy.judge({"status": "expired", "error": "DeadlineExpired",
                             "message": "the deadline passed before the job started"}, FEWSHOT)
    assert failed == strategy.Verdict(
        ERROR, None, "job expired: DeadlineExpired: the deadline passed before the job started")
    assert strategy.judge({"status": "failed"}, FEWSHOT).reason == "job failed: failed"


def test_each_tick_has_its_own_reference_and_the_order_reuses_it():
    reference = strategy.reference_for("abc")
    assert reference == "agent:abc" and strategy.tick_of(reference) == "abc"
    assert strategy.tick_of("chat:lobby:1-0") is None and strategy.tick_of(None) is None
    assert strategy.tick_of("agent:") is None
    order = strategy.order_for(reference, "acct", 1000, "LLAMA", "CRED")
    assert (order.order_id, order.quantity, order.side) == ("agent:abc", 1000, "buy")


def test_a_refusal_reads_as_its_type_and_message():
    from router.core.errors import InsufficientFunds

    reason = strategy.refusal_reason(InsufficientFunds("acct-1", 0, 155))
    assert reason == "InsufficientFunds: account acct-1 has 0, needs 155"


def test_a_probability_response_buys_above_three_and_keeps_its_reading():
    method = grading.method("prob-fewshot")

    def probs(pos: float, neg: float, neu: float) -> dict[str, object]:
        top = [{"token": " positive", "logprob": math.log(pos)}, {"token": " negative", "logprob": math.log(neg)},
               {"token": " factual", "logprob": math.log(neu)}]
        return done(" positive", choices=[{"text": " positive", "logprobs": [top[0] | {"top_logprobs": top}]}])

    bought = strategy.judge(probs(0.5, 0.1, 0.4), method)
    assert (bought.outcome, bought.grade) == (BUY, 4)
    assert bought.reading is not None and bought.reading.grade == pytest.approx(3.8)
    assert bought.reading.calibrated == pytest.approx({"positive": 0.5, "negative": 0.1, "neutral": 0.4})
    # Above 3 in expectation, but not by half a grade: a calm room leaning positive is not a buy.
    calm = strategy.judge(probs(0.3, 0.2, 0.5), method)
    assert (calm.outcome, calm.grade, calm.reason) == (SKIP, 3, "grade 3 (expected 3.20) is not above 3")
    skipped = strategy.judge(probs(0.1, 0.7, 0.2), method)
    assert (skipped.outcome, skipped.grade) == (SKIP, 2)
    # Calibration can turn the same answer around: this prompt alone says "positive" 80% of the time.
    prior = {"positive": 0.8, "negative": 0.1, "neutral": 0.1}
    assert strategy.judge(probs(0.5, 0.1, 0.4), method, prior).outcome == SKIP
    assert strategy.judge(done(" positive"), method).outcome == ERROR
