"""A unit of work as the herder signs it, and the checks every job must pass.

The herder runs the same checks at admission (before money moves); the worker
runs them again because it trusts nothing it did not verify itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from llama_tasks.errors import (
    BadStop,
    EmptyPrompt,
    InvalidMaxTokens,
    InvalidRequest,
    SamplingOutOfRange,
)

#: Allowed range of each sampling parameter, inclusive.
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (0, 1000),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.5, 2.0),
}
#: Sampling defaults of every request, whoever builds it (client, gateway, herder, worker).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_PENALTY = 1.0
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
#: Grammars and schemas longer than this are refused before parsing.
MAX_GRAMMAR_CHARS = 64_000


@dataclass
class Job:
    """The signed payload of one generation attempt."""

    job_id: str
    attempt: int
    model: str
    max_tokens: int
    expires_at: float
    issued_at: float
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    seed: int | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "Job":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(payload) - known
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}")
        try:
            return cls(**payload)
        except TypeError as exc:  # a required field is missing
            raise InvalidRequest(str(exc)) from None

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def validate(job: Job, max_tokens_cap: int) -> None:
    """Raise the typed error for the first thing wrong with ``job``."""
    if not isinstance(job.model, str) or not job.model:
        raise InvalidRequest(f"model must be a model name, got {job.model!r}")
    if job.messages is not None:
        if job.prompt is not None:
            raise InvalidRequest("give either a prompt or chat messages, not both")
        if not isinstance(job.messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in job.messages
        ):
            raise InvalidRequest("messages must be a list of {role, content} strings")
        if not any(m["content"].strip() for m in job.messages):
            raise EmptyPrompt()
    elif not isinstance(job.prompt, str) or not job.prompt.strip():
        raise EmptyPrompt()
    if isinstance(job.max_tokens, bool) or not isinstance(job.max_tokens, int):
        raise InvalidMaxTokens(job.max_tokens, max_tokens_cap)
    if not 1 <= job.max_tokens <= max_tokens_cap:
        raise InvalidMaxTokens(job.max_tokens, max_tokens_cap)
    for name, (low, high) in SAMPLING_RANGES.items():
        value = getattr(job, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            raise SamplingOutOfRange(name, value, low, high)
    if job.seed is not None and (isinstance(job.seed, bool) or not isinstance(job.seed, int) or job.seed < 0):
        raise SamplingOutOfRange("seed", job.seed, 0, 2**31 - 1)
    if not isinstance(job.stop, list) or len(job.stop) > MAX_STOP_STRINGS:
        raise BadStop(f"at most {MAX_STOP_STRINGS} stop strings")
    for s in job.stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise BadStop(f"each stop string must be 1..{MAX_STOP_CHARS} characters, got {s!r}")
    if job.grammar is not None and job.json_schema is not None:
        raise InvalidRequest("give either a grammar or a JSON schema, not both")
    if job.grammar is not None and (not isinstance(job.grammar, str) or len(job.grammar) > MAX_GRAMMAR_CHARS):
        raise InvalidRequest(f"grammar must be a string of at most {MAX_GRAMMAR_CHARS} characters")
