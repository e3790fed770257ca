"""The content-free label distributions of the probability methods, per model.

Contextual calibration divides by what the prompt alone makes the model say
(``scoring.CONTENT_FREE`` put where the chat goes). That depends on the model
and the prompt, never on a room, so it is measured once with the model in
process (``llamas agent accuracy`` measures and prints it for the method it
runs) and kept here: the agent's paid request stays one per tick, and
nothing is paid for calibration. A test checks these against a fresh
measurement with the bundled model. A model or method missing here is
graded uncalibrated.
"""

from __future__ import annotations

#: model name → probability method → label → probability (sums to 1).
CONTENT_FREE_PRIORS: dict[str, dict[str, dict[str, float]]] = {
    "smollm2": {
        # The mean over "N/A", "" and "[MASK]": the prompt alone leans to "factual", and
        # to "positive" over "negative", which is why uncalibrated grading misses bad news.
        "prob-fewshot": {"positive": 0.358847, "negative": 0.214572, "neutral": 0.426581},
    },
}
