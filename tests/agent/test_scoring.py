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


LABELS = ("positive", "negative", "neutral")
IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def test_an_affine_map_is_a_softmax_of_weighted_log_probabilities_plus_bias():
    p = {"positive": 0.6, "negative": 0.2, "neutral": 0.2}
    # W = I, b = 0 gives back the normalised distribution: softmax(log p) = p.
    assert scoring.Affine(LABELS, IDENTITY, (0.0, 0.0, 0.0)).apply(p) == pytest.approx(p)
    # A bias of log 3 on negative triples its odds: 0.6 : 0.6 : 0.2.
    shifted = scoring.Affine(LABELS, IDENTITY, (0.0, math.log(3), 0.0)).apply(p)
    assert shifted == pytest.approx({"positive": 3 / 7, "negative": 3 / 7, "neutral": 1 / 7})
    # W = diag(1) and b = -log(prior) is contextual calibration exactly.
    prior = {"positive": 0.5, "negative": 0.25, "neutral": 0.25}
    as_affine = scoring.Affine(LABELS, IDENTITY, tuple(-math.log(prior[label]) for label in LABELS))
    assert scoring.calibrate(p, as_affine) == pytest.approx(scoring.calibrate(p, prior))


def test_a_label_with_no_probability_at_all_is_floored_not_a_math_error():
    q = scoring.Affine(LABELS, IDENTITY, (0.0, 0.0, 0.0)).apply({"positive": 1.0, "negative": 0.0, "neutral": 0.0})
    assert q["positive"] == pytest.approx(1.0) and q["negative"] == pytest.approx(0.0)


def test_a_fitted_map_corrects_a_prompt_that_calls_bad_news_factual():
    from agent import fitting

    # The model's bias in miniature: bad news gets more "negative" than calm rooms do, yet
    # "factual" stays its likeliest word, so the likeliest raw label misses every negative.
    def room(pos: float, neg: float) -> dict[str, float]:
        return {"positive": pos, "negative": neg, "neutral": 1 - pos - neg}

    samples = [(room(0.6, 0.05), "positive"), (room(0.55, 0.1), "positive"), (room(0.65, 0.05), "positive"),
               (room(0.1, 0.35), "negative"), (room(0.05, 0.4), "negative"), (room(0.1, 0.3), "negative"),
               (room(0.1, 0.1), "neutral"), (room(0.15, 0.05), "neutral"), (room(0.05, 0.1), "neutral")]
    assert sum(scoring.most_likely(scoring.normalise(p)) == label for p, label in samples) == 6
    fitted = fitting.fit(samples, LABELS)
    assert [scoring.most_likely(fitted.apply(p)) for p, _ in samples] == [label for _, label in samples]
    assert fitting.fit(samples, LABELS) == fitted  # the same rooms always give the same map
    # Leave-one-out: one map per room, none of them the map fitted on all nine.
    held = fitting.leave_one_out(samples, LABELS)
    assert len(held) == 9 and fitted not in held
    assert held[0] == fitting.fit(samples[1:], LABELS)


def test_the_default_method_ships_a_fitted_calibration_and_the_others_a_prior_or_none():
    affine = grading.shipped_calibration("smollm2", grading.DEFAULT_METHOD)
    assert isinstance(affine, scoring.Affine) and affine.labels == grading.LABELS
    assert len(affine.weights) == 3 and all(len(row) == 3 for row in affine.weights) and len(affine.bias) == 3
    assert grading.shipped_calibration("smollm2", "prob-fewshot") == grading.shipped_prior("smollm2", "prob-fewshot")
    assert grading.shipped_calibration("another-model", grading.DEFAULT_METHOD) is None


def test_the_default_method_asks_about_news_with_the_fewshot_examples():
    request = grading.method(grading.DEFAULT_METHOD).build([ChatMessage("1-0", "ana", "The claim was denied.")])
    assert request.prompt is not None and request.prompt.startswith(grading.NEWS_QUESTION + "Chat:\n")
    assert request.prompt.count("\nSentiment: ") == 3
    assert request.prompt.endswith("ana: The claim was denied.\nSentiment:")
