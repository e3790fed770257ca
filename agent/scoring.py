"""Grading from probabilities: label scores from ``top_logprobs``, contextual calibration, expected grade.

A probability method asks for one token (``max_tokens=1``) with the
likeliest alternatives of that first token. Each label is scored by the
probability the model gives to the token(s) that start its word; the scores
are calibrated, and the calibrated distribution becomes a 1–5 grade as an
expected value. Two calibrations: contextual (Zhao et al. 2021, "Calibrate
Before Use": divide by the label probabilities the same prompt gives for
content-free inputs, then renormalise), which needs no labels, and ``Affine``,
the general form of the same map with its weights fitted on labelled rooms
(``agent.fitting``), which the default method ships.

Pure functions over plain numbers and the response documents the herder
forwards, so the agent and the offline evaluation read probabilities the same
way (``tests/agent/test_scoring.py`` holds them to exact numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import UnparseableAnswer

POSITIVE, NEGATIVE, NEUTRAL = "positive", "negative", "neutral"
#: The value of each label on the original agent's 1–5 scale: the grade is their expectation.
GRADE_VALUE = {NEGATIVE: 1.0, NEUTRAL: 3.0, POSITIVE: 5.0}
#: Inputs with no content, put where the chat goes (Zhao et al. average the same three).
CONTENT_FREE = ("N/A", "", "[MASK]")
#: Alternatives asked for at the first token: the most a worker gives (``llama_tasks.job``).
TOP_LOGPROBS = 20
#: A token shorter than this counts for a label word only when it is the whole word: a
#: one- or two-letter piece (" n", " ne") starts too many other words to be evidence.
MIN_PREFIX_CHARS = 3

Distribution = dict[str, float]


def label_probabilities(alternatives: Sequence[Mapping[str, Any]], words: Mapping[str, str]) -> Distribution:
    """Each label's probability as the first token, from one position's ``top_logprobs``.

    ``words`` maps the word the prompt's answers use (``"factual"``) to its
    label. Every alternative whose text, stripped and lower-cased, is the word
    or a prefix of it of at least ``MIN_PREFIX_CHARS`` counts for that label
    (" positive", "Positive" and " pos" are all the model starting to say it).
    A label with no alternative among those returned gets the smallest
    probability returned: it is at most that likely, and a zero would make
    calibration divide by nothing. Not normalised.
    """
    if not alternatives:
        raise ValueError("no alternatives to score")
    scores = {label: 0.0 for label in words.values()}
    found = set()
    for alt in alternatives:
        piece = str(alt.get("token", "")).strip().lower()
        probability = math.exp(float(alt["logprob"]))
        for word, label in words.items():
            if piece == word or (len(piece) >= MIN_PREFIX_CHARS and word.startswith(piece)):
                scores[label] += probability
                found.add(label)
    floor = min(math.exp(float(a["logprob"])) for a in alternatives)
    return {label: p if label in found else floor for label, p in scores.items()}


def normalise(p: Mapping[str, float]) -> Distribution:
    """``p`` scaled to sum to 1."""
    total = sum(p.values())
    if total <= 0:
        raise ValueError("probabilities sum to zero")
    return {label: v / total for label, v in p.items()}


def content_free_prior(distributions: Sequence[Mapping[str, float]]) -> Distribution:
    """The prompt's bias: the mean of the normalised label distributions of content-free inputs."""
    if not distributions:
        raise ValueError("no content-free distributions")
    normalised = [normalise(d) for d in distributions]
    return {label: sum(d[label] for d in normalised) / len(normalised) for label in normalised[0]}


@dataclass(frozen=True)
class Affine:
    """Calibration fitted on labelled rooms: ``softmax(W · log p + b)`` over the labels.

    Zhao et al. write contextual calibration as an affine map of the label
    probabilities and note that with labelled examples W and b can be learned;
    this learns them on log probabilities (multinomial logistic regression,
    ``agent.fitting``), so a prompt's bias *and* how far apart the model keeps
    the labels (SmolLM2 calls calm bad news "factual" with a probability only a
    little below a negative's) are both corrected. ``weights[i][j]`` is the
    weight of ``labels[i]``'s log probability for ``labels[j]``.
    """

    labels: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]

    def apply(self, p: Mapping[str, float]) -> Distribution:
        n = normalise(p)
        logs = [math.log(max(n[label], FLOOR)) for label in self.labels]
        z = [b + sum(x * row[j] for x, row in zip(logs, self.weights)) for j, b in enumerate(self.bias)]
        top = max(z)
        return normalise({label: math.exp(v - top) for label, v in zip(self.labels, z)})


#: The smallest probability a log is taken of: a label the model gave no mass at all.
FLOOR = 1e-12
#: How a probability method's label distribution is calibrated: a content-free prior
#: (contextual calibration), an ``Affine`` map fitted on labelled rooms, or not at all.
Calibration = Mapping[str, float] | Affine | None


def calibrate(p: Mapping[str, float], calibration: Calibration) -> Distribution:
    """``p`` calibrated: by an ``Affine`` map, or by a content-free prior (``normalise(p / prior)``,
    W = diag(prior)⁻¹, b = 0), or with None just normalised."""
    if calibration is None:
        return normalise(p)
    if isinstance(calibration, Affine):
        return calibration.apply(p)
    return normalise({label: v / calibration[label] for label, v in normalise(p).items()})


def expected_grade(q: Mapping[str, float]) -> float:
    """The 1–5 grade a distribution over the labels stands for: its expected ``GRADE_VALUE``."""
    return sum(GRADE_VALUE[label] * v for label, v in normalise(q).items())


def whole_grade(grade: float) -> int:
    """The grade on the original agent's whole-number 1–5 scale: the expected value rounded, halves up.

    The agent buys when this is above 3 (the expected value at least 3.5).
    Chosen on the tuning half: buying whenever the expectation is above 3
    buys every calm room that leans the least bit positive (58/90 right
    decisions on tune, against 83/90 for this rule).
    """
    return int(math.floor(grade + 0.5))


def most_likely(q: Mapping[str, float]) -> str:
    """The label with the highest probability (ties: the first in ``q``'s order)."""
    return max(q, key=lambda label: q[label])


def first_alternatives(response: Mapping[str, Any], method: str) -> list[dict[str, Any]]:
    """The first token's ``top_logprobs`` of a response's first choice; ``UnparseableAnswer`` without them."""
    try:
        entry = response["choices"][0]["logprobs"][0]
        alternatives = entry["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise UnparseableAnswer(method, "(no log probabilities in the response)") from None
    if not isinstance(alternatives, list) or not alternatives or not all(
            isinstance(a, dict) and isinstance(a.get("logprob"), (int, float)) for a in alternatives):
        raise UnparseableAnswer(method, "(no log probabilities in the response)")
    return alternatives
