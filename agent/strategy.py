"""The agent's strategy as pure functions: when to grade, what a response means, what to do.

Nothing here touches Redis, SQL, the herder or the exchange, so every rule is
tested directly (``tests/agent/test_strategy.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import UnparseableAnswer
from agent.exchange import Order
from agent.grading import Method, Reading
from agent.scoring import Calibration, whole_grade
from agent.world import ChatMessage

BUY, SKIP, ERROR = "buy", "skip", "error"
#: The original's rule: buy when the grade is above this.
BUY_ABOVE = 3
#: Prefix of the reference of every tick's request (the herder's idempotency key).
TICK_REFERENCE_PREFIX = "agent:"


@dataclass(frozen=True)
class Verdict:
    """What one Inference-Response means for the agent: buy, skip, or an error with its reason."""

    outcome: str
    #: The whole 1–5 grade (a probability method's expected value, rounded: ``reading.grade`` is exact).
    grade: int | None = None
    reason: str = ""
    #: What the response said, probabilities included (None for errors); not part of the verdict's identity.
    reading: Reading | None = field(default=None, compare=False)


def show_grade(grade: int | None, reading: Reading | None = None) -> str:
    """A grade as people read it: ``4``, or ``4 (expected 3.62)`` from a probability method's reading."""
    if grade is None:
        return "-"
    exact = reading.grade if reading is not None and reading.calibrated else None
    return str(grade) + (f" (expected {exact:.2f})" if exact is not None else "")


def reference_for(tick_id: str) -> str:
    """The reference of a tick's request: one tick, one reference, so never two payments."""
    return TICK_REFERENCE_PREFIX + tick_id


def tick_of(reference: object) -> str | None:
    """The tick a response's reference names, or None if it is not one of the agent's."""
    if isinstance(reference, str) and reference.startswith(TICK_REFERENCE_PREFIX):
        return reference[len(TICK_REFERENCE_PREFIX):] or None
    return None


def why_not_grade(history: Sequence[ChatMessage], last_graded_id: str | None, in_flight: str | None) -> str | None:
    """Why this tick should not pay for a grade, or None when it should.

    One request at a time (a slow herd must not pile up paid requests), and
    never twice for the same messages (nothing new was said).
    """
    if in_flight is not None:
        return f"waiting for the response to job {in_flight}"
    if not history:
        return "the room is empty"
    if history[-1].id == last_graded_id:
        return "nothing new since the last grade"
    return None


def decide(grade: int, reading: Reading | None = None) -> Verdict:
    """Buy above 3, otherwise skip."""
    if grade > BUY_ABOVE:
        return Verdict(BUY, grade, reading=reading)
    return Verdict(SKIP, grade, f"grade {show_grade(grade, reading)} is not above {BUY_ABOVE}", reading)


def judge(response: dict[str, Any], method: Method, calibration: Calibration = None) -> Verdict:
    """What an Inference-Response means: a failed job or an unreadable answer is an error.

    ``calibration`` calibrates a probability method (``grading.shipped_calibration``).
    """
    status = response.get("status")
    if status != "done":
        error = response.get("error") or status
        message = response.get("message") or ""
        return Verdict(ERROR, None, f"job {status}: {error}: {message}".rstrip(": "))
    try:
        reading = method.read(response, calibration)
    except UnparseableAnswer as exc:
        return Verdict(ERROR, None, str(exc))
    return decide(whole_grade(reading.grade), reading)


def order_for(reference: str, account: str, quantity: int, trade: str, quote: str) -> Order:
    """The Create-Order of a buy; its id is the tick's reference, so a duplicate is the same order."""
    return Order(account=account, order_id=reference, quantity=quantity, trade=trade, quote=quote)


def refusal_reason(exc: Exception) -> str:
    """One line for a refusal: the error's type and its message."""
    return f"{type(exc).__name__}: {exc}"
