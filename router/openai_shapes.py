"""Our responses in OpenAI's shapes: completions, stream chunks and SSE lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: Field of the stream chunk that tells a reader to discard the text so far.
RESTART_FIELD = "llamas_restart"


@dataclass
class Shapes:
    """Builds the documents of one chat or text completion."""

    job_id: str
    model: str
    chat: bool
    created: int

    def _base(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{prefix}-{self.job_id}", "object": kind, "created": self.created, "model": self.model}

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _choice(self, text: str | None, finish: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if delta:
            return {"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text or ""}, "finish_reason": finish}

    def final(self, text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._base(kind), "choices": [self._choice(text, finish, False)], "usage": usage}

    def role_chunk(self) -> dict[str, Any]:
        return {**self._base(self._chunk_kind),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}

    def text_chunk(self, text: str) -> dict[str, Any]:
        return {**self._base(self._chunk_kind), "choices": [self._choice(text, None, True)]}

    def restart_chunk(self, attempt: int) -> dict[str, Any]:
        """A chunk with no choices that says: the text so far is void, it starts over here.

        Sent only when a worker was lost and the attempt that ran again wrote
        different text; OpenAI clients see a chunk without choices.
        """
        return {**self._base(self._chunk_kind), "choices": [], RESTART_FIELD: {"attempt": attempt}}

    def closing_chunks(self, finish: str, usage: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
        last = {**self._base(self._chunk_kind), "choices": [self._choice(None, finish, True)]}
        if not include_usage:
            return [last | {"usage": usage}]
        return [last, {**self._base(self._chunk_kind), "choices": [], "usage": usage}]

    @staticmethod
    def sse(doc: dict[str, Any]) -> str:
        return f"data: {json.dumps(doc)}\n\n"
