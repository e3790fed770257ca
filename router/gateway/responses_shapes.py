"""A chat completion's answer in the Responses API's shapes: the response object, its output items, its events.

The one place that knows the Responses shapes; plain documents in, plain
documents (and SSE text) out. A chat choice becomes output items: a
``message`` with one ``output_text`` part when it has text, and a
``function_call`` item per tool call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from router.gateway import openai_shapes

#: Finish reasons of a complete answer; any other leaves the response ``incomplete``.
COMPLETE = ("stop", "tool_calls")
#: Why a response is incomplete, by the finish reason that cut it (OpenAI's names where it has one).
INCOMPLETE_REASONS = {"length": "max_output_tokens"}


def usage(resp: dict[str, Any]) -> dict[str, Any]:
    """A final response's token counts in the Responses shape, with what was offered, charged and refunded."""
    chat = openai_shapes.usage(resp)
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"],
            "offered": chat["offered"], "charged": chat["charged"], "refunded": chat["refunded"]}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class ResponseShapes:
    """Builds the documents and events of one response (one job)."""

    job_id: str
    created_at: int
    #: What the request asked for, echoed in every response object (model, instructions, tools, …).
    echo: dict[str, Any]
    #: The next event's ``sequence_number``.
    sequence: int = 0
    #: Output items sent so far in a stream, in order.
    sent: list[dict[str, Any]] = field(default_factory=list)

    @property
    def message_id(self) -> str:
        return f"msg_{self.job_id}"

    def response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        doc = {"id": f"resp_{self.job_id}", "object": "response", "created_at": self.created_at, "status": status,
               "error": None, "incomplete_details": None, "output": output, "usage": None, **self.echo}
        return doc | extra

    def output(self, choice: dict[str, Any]) -> list[dict[str, Any]]:
        """A chat choice's output items: its text as a message, then each tool call."""
        status = self.item_status(choice)
        items: list[dict[str, Any]] = []
        # A job that offered tools has its text parsed into ``content`` and ``tool_calls`` (``views.response``).
        text = (choice.get("content") or "") if "tool_calls" in choice else (choice.get("text") or "")
        calls = choice.get("tool_calls") or []
        if text or not calls:
            items.append(self.message(status, text))
        items += [self.function_call(i, call, "completed") for i, call in enumerate(calls)]
        return items

    def message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [text_part(text)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def function_call(self, i: int, call: dict[str, Any], status: str, arguments: str | None = None) -> dict[str, Any]:
        function = call.get("function") or {}
        return {"type": "function_call", "id": f"fc_{self.job_id}_{i}", "call_id": call.get("id"),
                "name": function.get("name"), "status": status,
                "arguments": function.get("arguments", "") if arguments is None else arguments}

    @staticmethod
    def item_status(choice: dict[str, Any]) -> str:
        return "completed" if choice.get("finish_reason") in COMPLETE else "incomplete"

    def final(self, resp: dict[str, Any]) -> dict[str, Any]:
        """The whole response of a done job."""
        choice = (resp.get("choices") or [{"text": resp.get("text"), "finish_reason": resp.get("finish_reason")}])[0]
        return self.response(self.item_status(choice), self.output(choice), usage=usage(resp),
                             incomplete_details=self._incomplete(choice))

    @staticmethod
    def _incomplete(choice: dict[str, Any]) -> dict[str, Any] | None:
        finish = choice.get("finish_reason")
        return None if finish in COMPLETE else {"reason": INCOMPLETE_REASONS.get(str(finish), finish)}

    # --- events ---------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> str:
        """One SSE event: an ``event:`` line naming its type, its data carrying the type and sequence number."""
        doc = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(doc)}\n\n"

    def opening(self) -> list[str]:
        started = self.response("in_progress", [])
        return [self.event("response.created", response=started),
                self.event("response.in_progress", response=started)]

    def text_opened(self) -> list[str]:
        """The message item and its text part begin (before the first delta)."""
        self.sent.append(self.message("in_progress", None))
        where = {"item_id": self.message_id, "output_index": len(self.sent) - 1}
        return [self.event("response.output_item.added", output_index=where["output_index"], item=self.sent[-1]),
                self.event("response.content_part.added", **where, content_index=0, part=text_part(""))]

    def text_delta(self, delta: str) -> str:
        return self.event("response.output_text.delta", item_id=self.message_id, output_index=0, content_index=0,
                          delta=delta, logprobs=[])

    def restart(self, attempt: int) -> str:
        """The text so far is void (a lost worker's retry wrote other text); deltas start over after it."""
        return self.event("response.llamas_restart", item_id=self.message_id, output_index=0, attempt=attempt)

    def closing(self, resp: dict[str, Any]) -> list[str]:
        """Every item's end (those not yet opened are opened whole), then ``response.completed``."""
        choice = (resp.get("choices") or [{"text": resp.get("text"), "finish_reason": resp.get("finish_reason")}])[0]
        items = self.output(choice)
        lines: list[str] = []
        for index, item in enumerate(items):
            if item["type"] == "message":
                lines += self._message_done(index, item)
            else:
                lines += self._call_done(index, item)
        final = self.final(resp)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return [*lines, self.event(kind, response=final)]

    def _message_done(self, index: int, item: dict[str, Any]) -> list[str]:
        text = item["content"][0]["text"]
        lines = []
        if index >= len(self.sent):  # never opened: the whole text in one delta
            lines += self.text_opened()
            if text:
                lines.append(self.text_delta(text))
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [*lines, self.event("response.output_text.done", **where, text=text, logprobs=[]),
                self.event("response.content_part.done", **where, part=text_part(text)),
                self.event("response.output_item.done", output_index=index, item=item)]

    def _call_done(self, index: int, item: dict[str, Any]) -> list[str]:
        self.sent.append(item)
        added = item | {"status": "in_progress", "arguments": ""}
        where = {"item_id": item["id"], "output_index": index}
        return [self.event("response.output_item.added", output_index=index, item=added),
                self.event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                self.event("response.function_call_arguments.done", **where, name=item["name"],
                           arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def failed(self, resp: dict[str, Any]) -> str:
        """``response.failed``: the job ended without an answer; its error says what a plain request would get."""
        error = openai_shapes.failed_chunk(resp)["error"]
        return self.event("response.failed", response=self.response(
            "failed", [], error={"code": error["code"], "message": error["message"], "type": error["type"],
                                 "status": error["status"],
                                 **({"retry_after_s": error["retry_after_s"]} if "retry_after_s" in error else {})}))
