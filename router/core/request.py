"""A paid request as a requester sends it, and the checks that need no ledger.

``Submission`` is the one schema of a request's fields for the Python client,
the CLI, the HTTP gateway and the herder: the generation fields come from
``llama_tasks.job.Generation`` (declared once), the payment and delivery
fields are declared here. ``check`` runs every test that needs neither the
ledger nor a tokenizer, so the client refuses a bad request before it sends
anything and the herder refuses it again before any money moves.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import urlparse

from llama_tasks.errors import InvalidRequest
from llama_tasks.job import Generation, Job, check_text, validate
from router.core.errors import BadChannel, BadDeadline, BadReference, InvalidOffer, NumberOutOfRange

#: Longest reference, callback task or queue, and webhook URL: the widths of
#: their columns, checked here because PostgreSQL would refuse them only at the INSERT.
MAX_REFERENCE_CHARS = 200
MAX_CALLBACK_CHARS = 200
MAX_WEBHOOK_CHARS = 2000
#: Longest deadline: a year, far past any generation, far below what a float timestamp can hold.
MAX_DEADLINE_S = 365 * 86400
#: Most digits an integer in an HTTP body may have (refused as the body is parsed): every
#: count, seed and amount fits in 20.
MAX_INT_DIGITS = 30
#: Integers past this are refused before any other check, whichever way they come: Python will
#: not write out one of more than 4,300 digits, so an error that quoted it could not be sent.
#: Smaller ones are left to their field's own check, which names the field.
_INT_BOUND = 10**1000
#: Generation fields added after jobs were first fingerprinted: left out of the
#: fingerprint at these defaults, so retrying an older job's submit still matches it.
LATER_DEFAULTS: dict[str, Any] = {"n": 1, "logprobs": False, "top_logprobs": 0, "tools": None, "tool_choice": None,
                                  "parallel_tool_calls": True, "input": None, "dimensions": None}


@dataclass(kw_only=True)
class Submission(Generation):
    """One paid request: what to generate, what is offered, where the answer goes."""

    fee: int | None = None
    multiplier: float | str | None = None
    reference: str | None = None
    callback_task: str | None = None
    callback_queue: str | None = None
    webhook_url: str | None = None
    deadline_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Submission:
        if not isinstance(data, dict):
            raise InvalidRequest("a request must be a JSON object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """sha256 of everything but the reference: equal requests, equal hash."""
        d = asdict(self)
        d.pop("reference")
        for name, default in LATER_DEFAULTS.items():
            if type(d[name]) is type(default) and d[name] == default:  # None is None's type too
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _is_text(value: object, limit: int) -> bool:
    """Printable text of 1 to ``limit`` characters (PostgreSQL refuses NUL in text)."""
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not value.isprintable():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate is "printable" but not text
        return False
    return True


def check_reference(sub: Submission) -> None:
    # Admission checks the reference before everything else, so the numbers go first here:
    # every later check may quote a value, and an integer of 5,000 digits cannot even be written out.
    _check_numbers(sub)
    if sub.reference is not None and not _is_text(sub.reference, MAX_REFERENCE_CHARS):
        check_text("reference", sub.reference)
        raise BadReference(sub.reference, MAX_REFERENCE_CHARS)


def _check_channels(sub: Submission) -> None:
    for name in ("callback_task", "callback_queue"):
        value = getattr(sub, name)
        if value is not None and not _is_text(value, MAX_CALLBACK_CHARS):
            raise BadChannel(f"{name} must be printable text of 1 to {MAX_CALLBACK_CHARS} characters")
    if sub.callback_queue and not sub.callback_task:
        raise BadChannel("callback_queue needs callback_task")
    if sub.webhook_url is not None:
        if not _is_text(sub.webhook_url, MAX_WEBHOOK_CHARS):
            raise BadChannel(f"webhook must be a URL of at most {MAX_WEBHOOK_CHARS} characters")
        url = urlparse(sub.webhook_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BadChannel("webhook must be an http(s) URL with a host")


def _check_deadline(deadline_s: object) -> None:
    if deadline_s is not None and (
        isinstance(deadline_s, bool)
        or not isinstance(deadline_s, (int, float))
        # NaN would never expire (SQLite stores it as NULL); no deadline is centuries away.
        or (isinstance(deadline_s, float) and not math.isfinite(deadline_s))
        or not 0 < deadline_s <= MAX_DEADLINE_S
    ):
        raise BadDeadline(deadline_s if isinstance(deadline_s, (int, float)) else repr(deadline_s))


def _check_offer(sub: Submission) -> None:
    # The amounts themselves are checked against the quote by ``fees.offer``;
    # here only their types, so that ``true`` is never taken for 1.
    if sub.fee is not None and (isinstance(sub.fee, bool) or not isinstance(sub.fee, int)):
        raise InvalidOffer(f"fee must be a positive integer, got {sub.fee!r}")
    m = sub.multiplier
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float, str))):
        raise InvalidOffer(f"multiplier must be a number, got {m!r}")
    if isinstance(m, float) and not math.isfinite(m):
        raise InvalidOffer(f"multiplier must be a finite number, got {m!r}")


def _check_numbers(sub: Submission) -> None:
    """Refuse an integer of more than a thousand digits anywhere in ``sub``, and NaN or infinity inside
    the JSON schema (its bounds would reach the grammar); other fields' own checks refuse the rest by name."""
    stack: list[tuple[str, Any]] = [(f.name, getattr(sub, f.name)) for f in fields(sub)]
    while stack:  # a loop, not recursion: a deeply nested schema must not overflow the stack
        name, value = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool) and not -_INT_BOUND < value < _INT_BOUND:
            raise NumberOutOfRange(f"{name} holds an integer of more than a thousand digits")
        if isinstance(value, float) and name == "json_schema" and not math.isfinite(value):
            raise NumberOutOfRange(f"json_schema holds {value}, which is not a finite number")
        if isinstance(value, dict):
            stack.extend((name, v) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((name, v) for v in value)


def check(sub: Submission, max_tokens_cap: int | None = None) -> None:
    """Raise the typed error for the first thing wrong with ``sub`` (no I/O)."""
    check_reference(sub)
    validate(sub, max_tokens_cap)
    _check_channels(sub)
    _check_deadline(sub.deadline_s)
    _check_offer(sub)


def as_job(job_id: str, attempt: int, generation: dict[str, Any], expires_at: float, issued_at: float) -> Job:
    """The ``Job`` of a stored generation (``Submission.generation()``) for one attempt."""
    return Job(job_id=job_id, attempt=attempt, expires_at=expires_at, issued_at=issued_at, **generation)
