"""The completions of a worker's result document, as the herder charges, stores and forwards them.

A worker returns ``choices`` (one per completion asked for, each with its
text, finish reason and, when asked, the log probability of every token) and
``cached_tokens`` (prompt tokens it reused from its prompt cache). A worker
that predates them returns one completion in the document's top-level
``text`` and ``finish_reason``: that is one choice and nothing cached.

Nothing here is trusted for money: settlement recounts every text itself,
cached tokens are clamped to the prompt, and at most the ``n`` completions
asked for are kept. Logprobs are kept only in their documented shape, so a
malformed document still settles instead of leaving its job running.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: A log probability that is not a finite number (a token the sampler ruled
#: out is -inf) is reported as this, as OpenAI does: JSON has no -Infinity.
FLOOR_LOGPROB = -9999.0


def asked(request_json: str) -> tuple[bool, int]:
    """``(logprobs, top_logprobs)`` of a job's stored generation fields (absent in older jobs)."""
    request = json.loads(request_json)
    top = request.get("top_logprobs", 0)
    return request.get("logprobs") is True, top if isinstance(top, int) and not isinstance(top, bool) else 0


def from_result(doc: dict[str, Any], n: int, logprobs: bool, top_logprobs: int) -> list[dict[str, Any]]:
    """The first ``n`` completions of ``doc`` as ``{index, text, finish_reason, logprobs}``.

    Texts are raw (settlement counts them before it makes them storable);
    ``logprobs`` is None unless the job asked for them and the worker sent a list.
    """
    raw = doc.get("choices")
    if not isinstance(raw, list) or not raw:
        raw = [{"text": doc.get("text"), "finish_reason": doc.get("finish_reason", "stop")}]
    out = []
    for index, choice in enumerate(_in_order(raw)[: max(n, 1)]):
        choice = choice if isinstance(choice, dict) else {}
        text = choice.get("text")
        out.append({
            "index": index,
            "text": text if isinstance(text, str) else "",  # str(None) would be charged as "None"
            "finish_reason": choice.get("finish_reason", "stop"),
            "logprobs": _logprobs(choice.get("logprobs"), top_logprobs) if logprobs else None,
        })
    return out


def _in_order(raw: list[Any]) -> list[Any]:
    """Choices by their ``index`` when each has its own; as listed otherwise."""
    indexes = [c.get("index") if isinstance(c, dict) else None for c in raw]
    numbered = [i for i in indexes if isinstance(i, int) and not isinstance(i, bool)]
    if len(set(numbered)) < len(raw):
        return raw
    return [choice for _, choice in sorted(zip(numbered, raw), key=lambda pair: pair[0])]


def cached_tokens(doc: dict[str, Any], prompt_tokens: int) -> int:
    """The worker's cached prompt tokens, within ``[0, prompt_tokens]``; 0 when it reports none."""
    value = doc.get("cached_tokens")
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(0, min(value, prompt_tokens))


def stored(choices_json: str | None, text: str | None, finish_reason: str | None,
           completion_tokens: int | None) -> list[dict[str, Any]]:
    """A finished job's completions from its row; one built from its text if it predates ``choices``."""
    if choices_json:
        return list(json.loads(choices_json))
    if text is None:
        return []
    return [{"index": 0, "text": text, "finish_reason": finish_reason,
             "completion_tokens": completion_tokens, "logprobs": None}]


def _logprobs(raw: Any, top_logprobs: int) -> list[dict[str, Any]] | None:
    if not isinstance(raw, list):
        return None
    out = []
    for entry in raw:
        entry = entry if isinstance(entry, dict) else {}
        alternatives = entry.get("top_logprobs")
        alternatives = alternatives if isinstance(alternatives, list) else []
        out.append(_token(entry) | {
            "top_logprobs": [_token(a) for a in alternatives[:top_logprobs] if isinstance(a, dict)],
        })
    return out


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    """``{token, logprob, bytes}``: text, a finite log probability, and the token's UTF-8 bytes."""
    token = entry.get("token")
    token = token if isinstance(token, str) else ""
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
