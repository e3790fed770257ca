"""The offline evaluation's bookkeeping with scripted answers: which calibration grades which room.

The numbers the README quotes come from the real model (``tests/agent/test_cli.py``);
here a stub answers so each room's label distribution is known exactly.
"""

from __future__ import annotations

import math
from typing import Any

from agent import accuracy, grading, scoring
from agent.grading import GradingRequest
from agent.rooms import LabelledRoom
from agent.world import ChatMessage

LABELS = grading.LABELS
IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
METHOD = grading.method(grading.DEFAULT_METHOD)


def room(name: str, label: str, text: str) -> LabelledRoom:
    return LabelledRoom(name, label, (ChatMessage("1-0", "ana", text),), "tune")


def answers(by_text: dict[str, tuple[float, float, float]]) -> Any:
    """A stub model: the first-token probabilities of positive, negative, factual for each chat."""
    def answer(request: GradingRequest) -> dict[str, Any]:
        text = next(t for t in by_text if request.prompt and request.prompt.endswith(f"ana: {t}\nSentiment:"))
        alts = [{"token": f" {w}", "logprob": math.log(p)} for w, p in zip(("positive", "negative", "factual"),
                                                                          by_text[text])]
        return {"status": "done", "text": alts[0]["token"], "choices": [{"logprobs": [{"top_logprobs": alts}]}]}
    return answer


def test_a_room_the_map_was_fitted_on_is_graded_by_the_map_fitted_without_it_whatever_its_name():
    calm_bad = room("mine-1", "negative", "The claim was denied.")
    answer = answers({"The claim was denied.": (0.1, 0.3, 0.6)})
    as_is = scoring.Affine(LABELS, IDENTITY, (0.0, 0.0, 0.0))  # likeliest raw label: neutral
    leaning = scoring.Affine(LABELS, IDENTITY, (0.0, math.log(3), 0.0))  # negative's odds tripled: 0.9 vs 0.6
    assert accuracy.evaluate(METHOD, [calm_bad], answer, as_is).correct == 0
    # The same chat under another name is still the tuning room: its held-out map grades it.
    tuning_copy = room("neg-001", "negative", "The claim was denied.")
    held = {accuracy.held_out_key(tuning_copy): leaning}
    report = accuracy.evaluate(METHOD, [calm_bad], answer, as_is, held_out_of=held)
    assert (report.correct, report.confusion["negative", "negative"]) == (1, 1)
    # Another chat is not, and gets the map fitted on all of them.
    other = room("mine-2", "negative", "The sale fell through.")
    report = accuracy.evaluate(METHOD, [other], answers({"The sale fell through.": (0.1, 0.3, 0.6)}), as_is,
                               held_out_of=held)
    assert report.correct == 0 and report.wrong == ["mine-2: negative → neutral"]


def test_refit_fits_on_the_rooms_and_keeps_one_held_out_map_per_room():
    rooms = [room("p1", "positive", "Great news!"), room("p2", "positive", "We won!"),
             room("n1", "negative", "It broke."), room("n2", "negative", "Claim denied."),
             room("u1", "neutral", "Bus at six."), room("u2", "neutral", "Shop opens at nine.")]
    answer = answers({"Great news!": (0.7, 0.1, 0.2), "We won!": (0.6, 0.1, 0.3), "It broke.": (0.1, 0.5, 0.4),
                      "Claim denied.": (0.1, 0.4, 0.5), "Bus at six.": (0.2, 0.1, 0.7),
                      "Shop opens at nine.": (0.15, 0.15, 0.7)})
    fitted, held = accuracy.refit(METHOD, rooms, answer)
    assert set(held) == {accuracy.held_out_key(r) for r in rooms}
    samples = accuracy.samples(METHOD, rooms, answer)
    assert held[accuracy.held_out_key(rooms[0])] == accuracy.fitting.fit(samples[1:], LABELS)
    assert fitted == accuracy.fitting.fit(samples, LABELS)
    assert accuracy.evaluate(METHOD, rooms, answer, fitted).correct == 6
