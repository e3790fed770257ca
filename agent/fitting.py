"""Fitting an ``Affine`` calibration on labelled rooms: multinomial logistic regression.

The inputs are the log label probabilities one prompt gives each room (three
numbers a room), so the model has twelve parameters; a little L2 weight decay
keeps them from chasing single rooms. Full-batch gradient descent from zero
with a fixed step count: the same rooms always give the same parameters.
Used offline (``llamas agent accuracy --refit``); the agent only applies the
shipped result (``scoring.Affine.apply``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.scoring import FLOOR, Affine, Distribution, normalise

#: L2 weight decay (summed over the rooms: light for 90 of them), gradient steps and step
#: size. Set once, not tuned: the gradient is flat long before the last step.
L2 = 1.0
STEPS = 3000
RATE = 0.1


def fit(samples: Sequence[tuple[Distribution, str]], labels: Sequence[str]) -> Affine:
    """The ``Affine`` map that best predicts each sample's label from its (uncalibrated) distribution."""
    if not samples:
        raise ValueError("no labelled samples to fit")
    x = np.array([_features(p, labels) for p, _ in samples])
    y = np.eye(len(labels))[[labels.index(label) for _, label in samples]]
    n = len(samples)
    weights, bias = np.zeros((len(labels), len(labels))), np.zeros(len(labels))
    for _ in range(STEPS):
        z = x @ weights + bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        error = p - y
        weights -= RATE * (x.T @ error / n + L2 * weights / n)
        bias -= RATE * error.mean(axis=0)
    return Affine(tuple(labels), tuple(tuple(round(float(w), 6) for w in row) for row in weights),
                  tuple(round(float(b), 6) for b in bias))


def leave_one_out(samples: Sequence[tuple[Distribution, str]], labels: Sequence[str]) -> list[Affine]:
    """For each sample, the map fitted on all the others: an honest estimate on the fitting set itself."""
    return [fit([s for j, s in enumerate(samples) if j != i], labels) for i in range(len(samples))]


def _features(p: Distribution, labels: Sequence[str]) -> list[float]:
    n = normalise(p)
    return [float(np.log(max(n[label], FLOOR))) for label in labels]
