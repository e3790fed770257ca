"""Our documents in OpenAI's shapes: completions, usage, failed jobs, stream chunks, SSE lines, the model list.

The one place that knows OpenAI's shapes; it returns plain documents (and
statuses), and the gateway's routers wrap them in responses.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from typing import Any

from llama_tasks import errors as worker_errors
from llama_tasks import tool_calls
from llama_tasks.errors import GenerationTimedOut, InvalidRequest
from router.core.models import CANCELLED, EXPIRED

#: Field of the stream chunk that tells a reader to discard the text so far.
RESTART_FIELD = "llamas_restart"


@dataclass
class Shapes:
    """Builds the documents of one chat or text completion."""

    job_id: str
    model: str
    chat: bool
    created: int
    #: Characters in a text completion's prompt: OpenAI's ``text_offset`` counts from the prompt's start.
    prompt_chars: int = 0
    #: Where each streamed choice's ``text_offset`` has reached.
    offsets: dict[int, TextOffsets] = field(default_factory=dict)

    def _base(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{prefix}-{self.job_id}", "object": kind, "created": self.created, "model": self.model}

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _choice(self, text: str | None, finish: str | None, index: int = 0,
                logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One choice of a stream chunk: a piece of its text (and its tokens' logprobs), or its end."""
        if not self.chat:
            legacy = None if logprobs is None else legacy_logprobs(logprobs, self._offsets(index))
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": legacy}
        choice = {"index": index, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        return choice

    def _offsets(self, index: int) -> TextOffsets:
        if index not in self.offsets:
            self.offsets[index] = TextOffsets(self.prompt_chars)
        return self.offsets[index]

    def final(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        """The whole completion: every choice (``{index, text, finish_reason, logprobs}``, as stored)."""
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [self._final_choice(c) for c in choices], "usage": usage}

    def _final_choice(self, choice: dict[str, Any]) -> dict[str, Any]:
        text, logprobs = choice.get("text") or "", choice.get("logprobs")
        if self.chat:
            return {"index": choice["index"], "message": _message(choice),
                    "logprobs": None if logprobs is None else {"content": logprobs},
                    "finish_reason": choice.get("finish_reason")}
        return {"index": choice["index"], "text": text,
                "logprobs": None if logprobs is None else legacy_logprobs(logprobs, self.prompt_chars),
                "finish_reason": choice.get("finish_reason")}

    def tool_chunks(self, events: list[tool_calls.Event], index: int = 0) -> list[dict[str, Any]]:
        """The chunks of choice ``index`` of a tool-offering chat: its parser's events (``tool_calls.ToolCallParser``)."""
        out = []
        for event in events:
            if isinstance(event, tool_calls.Content):
                out.append(self.text_chunk(event.text, index))
                continue
            if isinstance(event, tool_calls.CallStart):
                call = {"index": event.index, "id": event.id, "type": "function",
                        "function": {"name": event.name, "arguments": ""}}
            else:
                call = {"index": event.index, "function": {"arguments": event.text}}
            out.append({**self._base(self._chunk_kind),
                        "choices": [{"index": index, "delta": {"tool_calls": [call]}, "finish_reason": None}]})
        return out

    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        return {**self._base(self._chunk_kind),
                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}

    def text_chunk(self, text: str, index: int = 0, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A piece of choice ``index``'s text, with its tokens' log probabilities when they were asked for."""
        return {**self._base(self._chunk_kind), "choices": [self._choice(text, None, index, logprobs)]}

    def restart_chunk(self, attempt: int, index: int = 0) -> dict[str, Any]:
        """A chunk with no choices that says: choice ``index``'s text so far is void, it starts over here.

        Sent only when a worker was lost and the attempt that ran again wrote
        different text; OpenAI clients see a chunk without choices.
        """
        self.offsets.pop(index, None)
        return {**self._base(self._chunk_kind), "choices": [],
                RESTART_FIELD: {"attempt": attempt, "index": index}}

    def closing_chunks(self, choices: list[dict[str, Any]], usage: dict[str, Any],
                       include_usage: bool) -> list[dict[str, Any]]:
        """Each choice's finish reason (a chunk each), then ``usage``: in the last of them, or its own chunk."""
        ends = [{**self._base(self._chunk_kind), "choices": [self._choice(None, c.get("finish_reason"), c["index"])]}
                for c in choices]
        if not include_usage:
            return [*ends[:-1], ends[-1] | {"usage": usage}]
        return [*ends, {**self._base(self._chunk_kind), "choices": [], "usage": usage}]

    @staticmethod
    def sse(doc: dict[str, Any]) -> str:
        return f"data: {json.dumps(doc)}\n\n"


def _message(choice: dict[str, Any]) -> dict[str, Any]:
    """A chat choice's ``message``: its text, or (a job that offered tools) its content and calls."""
    if "tool_calls" not in choice:
        return {"role": "assistant", "content": choice.get("text") or ""}
    message = {"role": "assistant", "content": choice.get("content")}
    if choice["tool_calls"]:
        message["tool_calls"] = choice["tool_calls"]
    return message


class TextOffsets:
    """Character offsets of a text completion's tokens, token after token (a stream's chunks share one)."""

    def __init__(self, start: int) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.offset = start

    def take(self, entry: dict[str, Any]) -> int:
        """The offset of ``entry``'s token; the next token's starts after its text."""
        at = self.offset
        self.offset += len(self.decoder.decode(bytes(entry["bytes"])))
        return at


def legacy_logprobs(entries: list[dict[str, Any]], start: int | TextOffsets) -> dict[str, Any]:
    """Chat-style logprob entries in the legacy ``/v1/completions`` shape.

    ``text_offset`` is each token's character offset from the start of the
    prompt (``start`` characters long, or the offsets a stream's earlier
    chunks reached). A token that ends inside a character (its bytes are part
    of one) moves the offset only once the character is whole.
    """
    offsets = start if isinstance(start, TextOffsets) else TextOffsets(start)
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
        "text_offset": [offsets.take(e) for e in entries],
    }


def usage(resp: dict[str, Any]) -> dict[str, Any]:
    """A final response's token counts and money, as OpenAI's ``usage`` (plus what was offered, charged, refunded)."""
    # completion_tokens is already the sum over every choice.
    p, c = resp.get("prompt_tokens") or 0, resp.get("completion_tokens") or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": resp.get("cached_tokens") or 0},
            "offered": resp.get("offered"), "charged": resp.get("charged"), "refunded": resp.get("refunded")}


#: Seconds a requester is asked to wait (``Retry-After``) before sending again a request
#: whose job the service failed: long enough for a restarted herder or worker to serve.
RETRY_AFTER_S = 5


def failed_status(resp: dict[str, Any]) -> int:
    """HTTP status of a job that ended without completing, by whose limit or fault ended it; never a 500.

    408 the requester's own deadline passed in the queue; 409 it was cancelled;
    504 the worker's time limit cut the generation (the service's limit);
    422 the worker refused the request itself (``InvalidRequest``: sending it
    again fails again); 503 anything else, the service's own failure (workers
    lost, every attempt used, an attempt replayed), to be sent again.
    """
    if resp["status"] == EXPIRED:
        return 408
    if resp["status"] == CANCELLED:
        return 409
    # By type, as the gateway maps every error: the job's error is its exception's class name.
    error = getattr(worker_errors, resp.get("error") or "", None)
    if isinstance(error, type) and issubclass(error, GenerationTimedOut):
        return 504
    if isinstance(error, type) and issubclass(error, InvalidRequest):
        return 422
    return 503


def failed(resp: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` answering a job that ended without completing (expired, cancelled, failed).

    A job its time limit cut short carries what it made in ``choices`` and what it was charged in ``usage``.
    A 503 carries ``Retry-After`` (and ``retry_after_s`` in the body).
    """
    status = failed_status(resp)
    error: dict[str, Any] = {"message": resp.get("message"), "type": resp.get("error"),
                             "code": resp["status"], "job_id": resp["job_id"]}
    headers = {}
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
        error["retry_after_s"] = RETRY_AFTER_S
    if resp.get("charged"):
        # Paid for, so handed over: what a generation cut by its time limit made, and its cost.
        error["usage"] = usage(resp)
        error["choices"] = [{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"]}
                            for c in resp.get("choices") or []]
    return status, {"error": error}, headers


def failed_chunk(resp: dict[str, Any]) -> dict[str, Any]:
    """The stream event that ends a streamed job that did not complete.

    The stream's own status (200) was sent before the job ended, so the event
    says the status a plain request would have had, and when to send it again.
    """
    status = failed_status(resp)
    error: dict[str, Any] = {"message": resp.get("message"), "type": resp.get("error"), "code": resp["status"],
                             "status": status}
    if status == 503:
        error["retry_after_s"] = RETRY_AFTER_S
    return {"error": error}


def model_list(info: dict[str, Any]) -> dict[str, Any]:
    """``/v1/models`` from the herder's ``info`` document: every model the herd serves."""
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "created": 0, "owned_by": info["name"],
         "llamas_model_id": m["id"], "slots": m["slots"],
         # The most prompt + max_tokens one request may ask for: one slot's context.
         "context_length": m["context_per_job"]} for m in info["models"]
    ]}
