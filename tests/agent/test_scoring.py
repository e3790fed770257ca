"""Grading from probabilities: label scores, contextual calibration and the expected grade, in exact numbers."""

from __future__ import annotations

import math

import pytest

from agent import grading, scoring
from agent.errors import UnparseableAnswer
from agent.world import ChatMessage

WORDS = {"positive": "positive", "negative": "negative", "factual": "neutral"}


def alt(token: str, p: float) -> dict[str, object]:
    return {"token": token, "logprob": math.log(p), "bytes": list(token.encode())}


def response(*alternatives: dict[str, object]) -> dict[str, object]:
    first = alternatives[0]
    return {"status": "done", "text": first["token"],
            "choices": [{"text": first["token"], "logprobs": [dict(first, top_logprobs=list(alternatives))]}]}


def test_a_label_scores_every_alternative_that_starts_its_word_and_a_missing_one_gets_the_floor():
    p = scoring.label_probabilities(
        [alt(" positive", 0.5), alt(" Positive", 0.1), alt(" neg", 0.2), alt(" ne", 0.08), alt(" the", 0.05)], WORDS)
    assert p == pytest.approx({"positive": 0.6, "negative": 0.2, "neutral": 0.05})


def test_contextual_calibration_divides_by_the_content_free_prior_and_renormalises():
    prior = scoring.content_free_prior([{"positive": 0.3, "negative": 0.1, "neutral": 0.1},  # 0.6 0.2 0.2
                                        {"positive": 0.4, "negative": 0.3, "neutral": 0.3}])  # 0.4 0.3 0.3
    assert prior == pytest.approx({"positive": 0.5, "negative": 0.25, "neutral": 0.25})
    # 0.6/0.5, 0.2/0.25, 0.2/0.25 = 1.2, 0.8, 0.8 → 3/7, 2/7, 2/7
    q = scoring.calibrate({"positive": 0.6, "negative": 0.2, "neutral": 0.2}, prior)
    assert q == pytest.approx({"positive": 3 / 7, "negative": 2 / 7, "neutral": 2 / 7})
    # The content-free prior itself calibrates to uniform: no label is favoured by the prompt alone.
    assert scoring.calibrate(prior, prior) == pytest.approx({k: 1 / 3 for k in prior})
    assert scoring.calibrate({"positive": 2.0, "negative": 1.0, "neutral": 1.0}, None) == pytest.approx(
        {"positive": 0.5, "negative": 0.25, "neutral": 0.25})


def test_the_grade_is_the_expected_value_on_the_one_to_five_scale():
    assert scoring.expected_grade({"positive": 3 / 7, "negative": 2 / 7, "neutral": 2 / 7}) == pytest.approx(23 / 7)
    assert scoring.expected_grade({"positive": 1.0, "negative": 0.0, "neutral": 0.0}) == 5.0
    assert scoring.expected_grade({"positive": 0.0, "negative": 1.0, "neutral": 0.0}) == 1.0
    assert scoring.expected_grade({"positive": 0.25, "negative": 0.25, "neutral": 0.5}) == 3.0


def test_the_whole_grade_rounds_the_expected_value_halves_up():
    assert [scoring.whole_grade(g) for g in (1.0, 2.49, 2.5, 3.2, 3.49, 3.5, 4.99)] == [1, 2, 3, 3, 3, 4, 5]


def test_a_probability_method_reads_a_forwarded_response_calibrated():
    method = grading.method("prob-fewshot")
    prior = {"positive": 0.5, "negative": 0.25, "neutral": 0.25}
    reading = method.read(response(alt(" positive", 0.6), alt(" negative", 0.2), alt(" factual", 0.2)), prior)
    assert reading.label == "positive" and reading.grade == pytest.approx(23 / 7)
    assert reading.raw == pytest.approx({"positive": 0.6, "negative": 0.2, "neutral": 0.2})
    assert reading.calibrated == pytest.approx({"positive": 3 / 7, "negative": 2 / 7, "neutral": 2 / 7})


def test_a_response_without_log_probabilities_is_unreadable():
    method = grading.method("prob-fewshot")
    for bad in ({"status": "done", "text": " positive"}, {"choices": [{"logprobs": None}]},
                {"choices": [{"logprobs": [{"top_logprobs": []}]}]}):
        with pytest.raises(UnparseableAnswer):
            method.read(bad)


def test_a_probability_request_asks_for_one_token_and_its_alternatives_and_survives_the_store():
    method = grading.method(grading.DEFAULT_METHOD)
    assert method.scores_probabilities
    kwargs = method.build([ChatMessage("1-0", "ana", "Great news!")]).run_kwargs()
    assert (kwargs["tokens"], kwargs["logprobs"], kwargs["top_logprobs"]) == (1, True, scoring.TOP_LOGPROBS)
    assert kwargs["prompt"].endswith("Chat:\nana: Great news!\nSentiment:")
    cf = method.content_free_requests()
    assert [r.prompt.rsplit("Chat:\n", 1)[1] for r in cf if r.prompt] == [
        f"{text}\nSentiment:" for text in scoring.CONTENT_FREE]
