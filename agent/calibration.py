"""The calibrations of the probability methods, per model, measured offline and shipped.

Two kinds (``agent.scoring``): the content-free label distribution of a
prompt (contextual calibration: what the prompt alone makes the model say,
``scoring.CONTENT_FREE`` put where the chat goes), and an ``Affine`` map
fitted on the tuning half of the labelled rooms. Both depend on the model and
the prompt, never on the room graded, so they are measured once with the
model in process (``llamas agent accuracy`` prints the prior; ``--refit``
fits the map again) and kept here: the agent's paid request stays one per
tick, and nothing is paid for calibration. A model or method missing here is
graded uncalibrated.

They hold for the model file, not for every machine to the last digit:
llama.cpp's CPU kernels differ (AVX2, AVX-512) and move the label
probabilities by a few hundredths, so the tests compare a fresh measurement
with these within that.
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

Weights = tuple[tuple[float, ...], ...]
#: model name → probability method → (weights, bias) of the ``scoring.Affine`` calibration
#: fitted on the tuning half of the shipped rooms (``llamas agent accuracy --refit`` fits it
#: again and prints it). ``weights[i][j]`` is the weight of label i's log probability for
#: label j, labels in ``grading.LABELS`` order: positive, negative, neutral.
FITTED: dict[str, dict[str, tuple[Weights, tuple[float, ...]]]] = {
    "smollm2": {
        # The prompt alone almost never says "factual" (content-free: positive 0.60,
        # negative 0.39, factual 0.02), hence the bias of +4.7 for neutral and -4.7 for
        # positive: a room is neutral unless its positive or negative share stands out.
        "prob-news": (((0.623182, -1.055438, 0.432256),
                       (-0.927089, 1.069773, -0.142685),
                       (-0.632414, -0.430891, 1.063305)),
                      (-4.714921, 0.053802, 4.661119)),
    },
}
