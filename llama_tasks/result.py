"""One attempt's result: what a worker sends back and the herder settles.

The worker (``runtime``) and the scripted worker (``scripted``) build a
``Result``; ``to_json`` is the document on the results stream and in the
result store (the worker signs that document as it is sent: ``signing``).
The herder reads it back with ``from_json``, which refuses nothing: a wrong
type reads as empty, choices are put in their ``index`` order, log
probabilities are kept only in their documented shape. Whether the document
is settled at all is the herder's check of its signature
(``router.core.provenance``); a malformed but signed one still settles
instead of leaving its job running.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: A log probability that is not a finite number (a token the sampler ruled
#: out is -inf) is reported as this, as OpenAI does: JSON has no -Infinity.
FLOOR_LOGPROB = -9999.0
#: The finish reason of a choice its time limit ended: the text is what was made until then.
TIME_LIMIT = "time_limit"


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _str(value: Any) -> str:
    # str(None) would be charged as "None".
    return value if isinstance(value, str) else ""


def attempt_of(doc: dict[str, Any]) -> tuple[str, int]:
    """``(job id, attempt)`` a document says it reports, as ``Result.from_json`` reads them.

    -1 matches no attempt: a result that does not say which one settles none.
    """
    return _str(doc.get("job_id")), _int(doc.get("attempt"), -1)


@dataclass(frozen=True)
class Choice:
    """One completion of a job: its text, why it stopped, its tokens and, when asked, each token's logprobs."""

    index: int
    text: str
    finish_reason: str
    #: Tokens generated for this choice, as the worker signed it (what is charged, at most max_tokens).
    completion_tokens: int = 0
    #: ``[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]``, or None when not asked.
    logprobs: list[dict[str, Any]] | None = None
    #: An embedding job's vector for input ``index`` (``llama_tasks.embedding``: base64 of
    #: little-endian float32, unit norm); None for a completion.
    embedding: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"index": self.index, "text": self.text, "finish_reason": self.finish_reason,
               "completion_tokens": self.completion_tokens, "logprobs": self.logprobs}
        # Only where there is one: a completion's documents stay as they were.
        return doc if self.embedding is None else doc | {"embedding": self.embedding}

    @classmethod
    def from_json(cls, raw: Any, index: int) -> Choice:
        """The choice at position ``index`` from what a document says of it."""
        raw = raw if isinstance(raw, dict) else {}
        finish = raw.get("finish_reason", "stop")
        return cls(index=index, text=_str(raw.get("text")),
                   finish_reason=finish if isinstance(finish, str) else str(finish),
                   completion_tokens=max(0, _int(raw.get("completion_tokens"))),
                   logprobs=_logprobs(raw.get("logprobs")),
                   embedding=raw["embedding"] if isinstance(raw.get("embedding"), str) else None)


@dataclass(frozen=True)
class Result:
    """Every choice of one attempt, with what identifies the attempt and what it cost the worker."""

    task_id: str
    job_id: str
    attempt: int
    model: str
    #: sha256 of the model file the worker verified at load.
    model_id: str
    choices: tuple[Choice, ...]
    prompt_tokens: int = 0
    #: The worker's sum over its choices; the herder charges each choice's own count.
    completion_tokens: int = 0
    #: Prompt tokens reused from the worker's prompt cache.
    cached_tokens: int = 0
    worker: str = ""
    pid: int = 0
    #: How many times the worker process has loaded its model (1 in a healthy worker).
    load_count: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def first(self) -> Choice:
        return self.choices[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "model": self.model,
            "model_id": self.model_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "choices": [c.to_json() for c in self.choices],
            "worker": self.worker,
            "pid": self.pid,
            "load_count": self.load_count,
            "timings": dict(self.timings),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Result:
        """A worker's document as a ``Result``: never raises; at least one choice (empty when none was sent)."""
        raw = doc.get("choices")
        raw = raw if isinstance(raw, list) and raw else [{}]
        timings = doc.get("timings")
        job_id, attempt = attempt_of(doc)
        return cls(
            task_id=_str(doc.get("task_id")),
            job_id=job_id,
            attempt=attempt,
            model=_str(doc.get("model")),
            model_id=_str(doc.get("model_id")),
            choices=tuple(Choice.from_json(c, i) for i, c in enumerate(_in_order(raw))),
            prompt_tokens=max(0, _int(doc.get("prompt_tokens"))),
            completion_tokens=max(0, _int(doc.get("completion_tokens"))),
            cached_tokens=max(0, _int(doc.get("cached_tokens"))),
            worker=_str(doc.get("worker")),
            pid=_int(doc.get("pid")),
            load_count=_int(doc.get("load_count")),
            timings={k: float(v) for k, v in timings.items()
                     if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                     and math.isfinite(v)} if isinstance(timings, dict) else {},
        )


def _in_order(raw: list[Any]) -> list[Any]:
    """Choices by their ``index`` when each has its own; as listed otherwise."""
    indexes = [c.get("index") if isinstance(c, dict) else None for c in raw]
    numbered = [i for i in indexes if isinstance(i, int) and not isinstance(i, bool)]
    if len(set(numbered)) < len(raw):
        return raw
    return [choice for _, choice in sorted(zip(numbered, raw, strict=True), key=lambda pair: pair[0])]


def _logprobs(raw: Any) -> list[dict[str, Any]] | None:
    if not isinstance(raw, list):
        return None
    out = []
    for entry in raw:
        entry = entry if isinstance(entry, dict) else {}
        alternatives = entry.get("top_logprobs")
        alternatives = alternatives if isinstance(alternatives, list) else []
        out.append(_token(entry) | {"top_logprobs": [_token(a) for a in alternatives if isinstance(a, dict)]})
    return out


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    """``{token, logprob, bytes}``: text, a finite log probability, and the token's UTF-8 bytes."""
    token = _str(entry.get("token"))
    logprob = entry.get("logprob")
    try:
        value = float(logprob) if isinstance(logprob, (int, float)) and not isinstance(logprob, bool) else None
    except OverflowError:  # an integer past any float
        value = None
    # A probability is at most 1: its log at most 0.
    logprob = min(value, 0.0) if value is not None and math.isfinite(value) else FLOOR_LOGPROB
    raw_bytes = entry.get("bytes")
    # A token may be part of a character: its bytes, not its text, say which part.
    if not isinstance(raw_bytes, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in raw_bytes):
        raw_bytes = list(token.encode("utf-8", "replace"))
    return {"token": token, "logprob": logprob, "bytes": list(raw_bytes)}
