"""Tool calls on chat requests: the fields, what they mean, and the checks every request must pass.

A chat request (``Generation``) carries OpenAI's own fields, unchanged:

- ``tools``: ``[{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}]``,
  ``parameters`` a JSON schema of the arguments (an object with no properties when absent);
- ``tool_choice``: ``"auto"`` (the default when tools are given), ``"none"``, ``"required"``, or
  ``{"type": "function", "function": {"name": …}}``;
- ``parallel_tool_calls``: whether one answer may hold several calls (default true);
- ``messages``: besides ``{role, content}``, an assistant message may carry ``tool_calls``
  (``[{"id", "type": "function", "function": {"name", "arguments": JSON text}}]``, its
  content then may be ``""``: content is always a string here, the gateway turns OpenAI's
  null into ``""``) and a ``{"role": "tool", "tool_call_id", "content"}`` message answers one.

The answer (``router.core.views.response``, what every channel gets) keeps each choice's
``text`` as the model wrote it and adds, when the job offered tools, ``content`` (the text
around the calls, or None), ``tool_calls`` in the shape above and ``finish_reason:
"tool_calls"`` (``tool_calls.parse``); a stream reads the same with
``tool_calls.parser_for(generation, job_id, choice)``. These checks run in the client, at admission (before money moves) and
again in the worker; a failure is ``BadTools`` (an HTTP 400 naming the field). Whether each
schema compiles to a grammar is checked where the grammar is built (``engine.grammar_text``),
at admission too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import exceptions as schema_errors
from jsonschema import validators

from llama_tasks.errors import BadTools

#: What opens and closes one call in the model's output (and in rendered conversations).
OPEN = "<tool_call>"
CLOSE = "</tool_call>"
#: What separates parallel calls: nothing. After a call a small model would rather write a newline
#: than end; with the newline ruled out it ends, instead of repeating its call until max_tokens.
SEPARATOR = ""
#: What a function's name may be (OpenAI's rule).
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Most functions one request may offer.
MAX_TOOLS = 64
#: Most characters of a function's description.
MAX_DESCRIPTION_CHARS = 4096
#: Longest call id a conversation may carry.
MAX_CALL_ID_CHARS = 128
CHOICES = ("auto", "none", "required")
#: The arguments schema of a function that declares none: an object with nothing in it.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})


def functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The offered functions by name: ``{name: {"description", "parameters"}}`` (checked tools only)."""
    out = {}
    for tool in tools or []:
        fn = tool["function"]
        out[fn["name"]] = {"description": fn.get("description") or "",
                           "parameters": fn.get("parameters") or NO_PARAMETERS}
    return out


def choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str | None:
    """What the model is asked for: None (no tools offered), ``auto``, ``required``, or one function's name.

    ``none`` offers no tools at all: they are neither rendered into the prompt nor callable.
    """
    if not tools or tool_choice == "none":
        return None
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        return tool_choice
    return str(tool_choice["function"]["name"])


def offered(tool_choice: Any, tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The functions the model may call, by name (a named ``tool_choice`` narrows them to one)."""
    mode = choice(tool_choice, tools)
    if mode is None:
        return {}
    every = functions(tools)
    return every if mode in ("auto", "required") else {mode: every[mode]}


def _check_schema(i: int, schema: Any) -> None:
    param = f"tools[{i}].function.parameters"
    if not isinstance(schema, dict):
        raise BadTools(param, "must be a JSON schema object")
    if schema.get("type", "object") != "object":
        raise BadTools(param, "must describe an object (type: object)")
    try:
        validators.validator_for(schema).check_schema(schema)
    except schema_errors.SchemaError as exc:
        raise BadTools(param, f"not a valid JSON schema: {exc.message}") from None


def _check_tool(i: int, tool: Any) -> str:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise BadTools(f"tools[{i}].type", f"only function tools are supported, got {kind!r}")
    if set(tool) - {"type", "function"}:
        raise BadTools(f"tools[{i}]", f"unknown field {sorted(set(tool) - {'type', 'function'})[0]!r}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise BadTools(f"tools[{i}].function", "must be an object with a name")
    if set(fn) - FUNCTION_KEYS:
        raise BadTools(f"tools[{i}].function", f"unknown field {sorted(set(fn) - FUNCTION_KEYS)[0]!r}")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise BadTools(f"tools[{i}].function.name", "must be 1 to 64 letters, digits, _ or -")
    description = fn.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS):
        raise BadTools(f"tools[{i}].function.description", f"must be text of at most {MAX_DESCRIPTION_CHARS} characters")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise BadTools(f"tools[{i}].function.strict", "must be true or false")
    if fn.get("parameters") is not None:
        _check_schema(i, fn["parameters"])
    return name


def _check_choice(tool_choice: Any, names: list[str]) -> None:
    if tool_choice is None:
        return
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise BadTools("tool_choice", f"must be one of {', '.join(CHOICES)} or a named function")
    elif (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function"
          or not isinstance(tool_choice.get("function"), dict)
          or not isinstance(tool_choice["function"].get("name"), str)):
        raise BadTools("tool_choice", 'a named choice is {"type": "function", "function": {"name": …}}')
    elif tool_choice["function"]["name"] not in names:
        raise BadTools("tool_choice", f"names no offered tool: {tool_choice['function']['name']!r}")
    if not names and tool_choice not in (None, "none", "auto"):  # auto and none ask nothing without tools
        raise BadTools("tool_choice", "only allowed when tools are given")


def check(tools: Any, tool_choice: Any, parallel_tool_calls: Any, constrained: bool) -> None:
    """Raise ``BadTools`` for the first thing wrong with a request's tool fields.

    ``constrained``: the request also asks for a grammar or JSON schema, which
    cannot hold together with a tool call's own grammar.
    """
    if tools is not None:
        if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
            raise BadTools("tools", f"must be a list of 1 to {MAX_TOOLS} function tools")
    names = [_check_tool(i, t) for i, t in enumerate(tools or [])]
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise BadTools(f"tools[{i}].function.name", f"{name!r} is offered twice")
        seen.add(name)
    _check_choice(tool_choice, names)
    if not isinstance(parallel_tool_calls, bool):
        raise BadTools("parallel_tool_calls", "must be true or false")
    if constrained and choice(tool_choice, tools) is not None:
        raise BadTools("tools", "give tools or a grammar / JSON schema / response_format, not both "
                       "(or tool_choice none)")


def _check_call(i: int, j: int, call: Any) -> str:
    param = f"messages[{i}].tool_calls[{j}]"
    if not isinstance(call, dict) or call.get("type", "function") != "function" or set(call) - {
            "id", "type", "function"}:
        raise BadTools(param, 'must be {"id", "type": "function", "function": {"name", "arguments"}}')
    call_id, fn = call.get("id"), call.get("function")
    if not isinstance(call_id, str) or not 1 <= len(call_id) <= MAX_CALL_ID_CHARS:
        raise BadTools(f"{param}.id", f"must be text of 1 to {MAX_CALL_ID_CHARS} characters")
    if not isinstance(fn, dict) or set(fn) != {"name", "arguments"} or not isinstance(fn["name"], str):
        raise BadTools(f"{param}.function", "must be {name, arguments}")
    if not NAME.match(fn["name"]):
        raise BadTools(f"{param}.function.name", "must be 1 to 64 letters, digits, _ or -")
    try:
        arguments = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else None
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise BadTools(f"{param}.function.arguments", "must be a JSON object as text")
    return call_id


def check_messages(messages: list[Any]) -> None:
    """Raise ``BadTools`` for an assistant ``tool_calls`` or a ``tool`` message that is malformed,
    or a ``tool`` message that answers no earlier call (or one already answered)."""
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue  # the caller's check names it
        if "tool_calls" in m:
            if m.get("role") != "assistant":
                raise BadTools(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not calls:
                raise BadTools(f"messages[{i}].tool_calls", "must be a non-empty list of calls")
            for j, call in enumerate(calls):
                call_id = _check_call(i, j, call)
                if call_id in open_calls:
                    raise BadTools(f"messages[{i}].tool_calls[{j}].id", f"{call_id!r} is used twice")
                open_calls.add(call_id)
        if m.get("role") == "tool":
            answered = m.get("tool_call_id")
            if not isinstance(answered, str) or answered not in open_calls:
                raise BadTools(f"messages[{i}].tool_call_id", f"answers no earlier tool call: {answered!r}")
            open_calls.discard(answered)
        elif "tool_call_id" in m:
            raise BadTools(f"messages[{i}].tool_call_id", "only tool messages answer a call")


def call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Every call id of a (checked) conversation → the function it called."""
    return {call["id"]: call["function"]["name"]
            for m in messages for call in m.get("tool_calls") or []}
