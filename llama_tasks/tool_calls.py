"""The model's output → OpenAI's ``tool_calls``: whole, or piece by piece as it streams.

The model writes each call as ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
(``tool_grammar`` makes sure of it when it can). ``ToolCallParser`` reads
the output in pieces of any size and says, as soon as each is known:

- ``Content``: text outside the calls. Text that may still turn out to be
  the start of ``<tool_call>`` is held back until it is known not to be, and
  whitespace around a call is dropped (the separators the grammar allows);
  an output with no call comes out exactly as written.
- ``CallStart`` (the call's ``index``, ``id`` and function ``name``), then
  ``Arguments`` pieces: the arguments as JSON text (``json.dumps`` of the
  object the model wrote), cut into pieces of ``ARGUMENT_PIECE_CHARS``.

A call is reported only once it is closed, parses, names an offered
function, and its arguments validate against that function's JSON schema:
a call that does not (cut short by ``max_tokens``, or written without a
grammar) is never handed on as a call but as the text it is, so what a
requester executes is always schema-valid. The whole-output answer
(``parse``) runs the same parser, so a stream reassembles to exactly it.

Call ids are ``call_`` and a hash of the job, the choice and the call's
position: the stream, the final answer and a replayed delivery all agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import validators

from llama_tasks import tools
from llama_tasks.tools import CLOSE, OPEN

#: Characters of a call's arguments per ``Arguments`` piece (and per stream chunk).
ARGUMENT_PIECE_CHARS = 16
#: The finish reason of a choice that ends with calls.
TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class Content:
    """Text of the answer outside any call."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """A call begins: its position among the choice's calls, its id and the function it calls."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class Arguments:
    """The next piece of call ``index``'s arguments (JSON text)."""

    index: int
    text: str


Event = Content | CallStart | Arguments


def call_id(job_id: str, choice: int, index: int) -> str:
    """The id of call ``index`` of choice ``choice`` of job ``job_id``: the same wherever it is computed."""
    return "call_" + hashlib.sha256(f"{job_id}:{choice}:{index}".encode()).hexdigest()[:24]


def _held_prefix(text: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``OPEN``."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0


@dataclass
class ToolCallParser:
    """Reads one choice's output as it comes and reports its content and calls (see the module)."""

    functions: Mapping[str, Mapping[str, Any]]
    job_id: str
    choice: int = 0
    calls: int = 0
    _buffer: str = ""
    _in_call: bool = False
    _space: str = ""  # whitespace held until what follows it is known
    _after_call: bool = False
    _validators: dict[str, Any] = field(default_factory=dict)

    def fresh(self) -> ToolCallParser:
        """A parser for the same choice that has read nothing (its output starts over)."""
        return ToolCallParser(self.functions, self.job_id, self.choice)

    def feed(self, text: str) -> list[Event]:
        """The events ``text`` (the next piece of output) completes."""
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return events
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE):]
                self._in_call = False
                events += self._call(body)
                continue
            start = self._buffer.find(OPEN)
            if start < 0:
                keep = _held_prefix(self._buffer)
                upto = len(self._buffer) - keep
                events += self._text(self._buffer[:upto])
                self._buffer = self._buffer[upto:]
                return events
            events += self._text(self._buffer[:start])
            self._buffer = self._buffer[start + len(OPEN):]
            self._in_call = True

    def close(self) -> list[Event]:
        """The events of what is still held once the output has ended."""
        rest = (OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        events = self._text(rest, raw=True)
        if not self.calls and self._space:  # an answer without calls is kept exactly as written
            events.append(Content(self._space))
        self._space = ""
        return events

    def _text(self, text: str, raw: bool = False) -> list[Event]:
        if not text:
            return []
        stripped = text.rstrip()
        if not stripped:
            self._space += text
            return []
        # Whitespace between a call and what follows is a separator: dropped (the text itself stays whole
        # when it is raw, the text of a call that was not one).
        lead = "" if self._after_call else self._space
        if self._after_call and not raw:
            stripped = stripped.lstrip()
        self._space, self._after_call = text[len(text.rstrip()):], False
        return [Content(lead + stripped)]

    def _call(self, body: str) -> list[Event]:
        parsed = self._valid(body)
        if parsed is None:  # never a call: the text it is
            return self._text(OPEN + body + CLOSE, raw=True)
        name, arguments = parsed
        index, self.calls = self.calls, self.calls + 1
        self._space, self._after_call = "", True
        text = json.dumps(arguments, ensure_ascii=False)
        return [CallStart(index, call_id(self.job_id, self.choice, index), name),
                *(Arguments(index, text[i:i + ARGUMENT_PIECE_CHARS]) for i in range(0, len(text), ARGUMENT_PIECE_CHARS))]

    def _valid(self, body: str) -> tuple[str, dict[str, Any]] | None:
        try:
            call = json.loads(body)
        except ValueError:
            return None
        if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
            return None
        name, arguments = call["name"], call["arguments"]
        if not isinstance(name, str) or name not in self.functions or not isinstance(arguments, dict):
            return None
        if name not in self._validators:
            schema = self.functions[name]["parameters"]
            self._validators[name] = validators.validator_for(schema)(schema)
        return (name, arguments) if self._validators[name].is_valid(arguments) else None


def parser_for(generation: Mapping[str, Any], job_id: str, choice: int = 0) -> ToolCallParser | None:
    """A parser for a choice of the job whose generation fields these are; None when it offered no tools."""
    offered = tools.offered(generation.get("tool_choice"), generation.get("tools"))
    return ToolCallParser(offered, job_id, choice) if offered else None


def assemble(events: list[Event]) -> tuple[str, list[dict[str, Any]]]:
    """``(content, tool_calls)`` from a choice's events, in OpenAI's message shape."""
    content, calls, arguments = "", list[dict[str, Any]](), list[str]()
    for event in events:
        if isinstance(event, Content):
            content += event.text
        elif isinstance(event, CallStart):
            calls.append({"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}})
            arguments.append("")
        else:
            arguments[event.index] += event.text
    for call, text in zip(calls, arguments, strict=True):
        call["function"]["arguments"] = text
    return content, calls


def parse(parser: ToolCallParser, text: str, finish_reason: str) -> dict[str, Any]:
    """One whole choice: ``{"content", "tool_calls", "finish_reason"}``.

    ``content`` is None when calls were made and no text was written
    around them; ``finish_reason`` is ``tool_calls`` when the model ended
    after its calls (one cut by ``max_tokens`` keeps ``length``).
    """
    content, calls = assemble(parser.feed(text) + parser.close())
    return {"content": content if content or not calls else None, "tool_calls": calls,
            "finish_reason": TOOL_CALLS if calls and finish_reason == "stop" else finish_reason}
