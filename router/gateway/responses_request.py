"""OpenAI Responses request bodies → the chat completion they ask for.

``POST /v1/responses`` is chat completions in another shape: a Responses
body becomes the chat body it means (messages, tools, response_format,
max_tokens), and that body goes through ``openai_request.submission``, the
chat endpoint's own checks, then the same admission, money and worker. What
this module refuses is what the Responses shape adds and the service does
not do, each by name: stored responses and conversations
(``previous_response_id``, ``store: true``, item references), built-in tools,
reasoning, non-text input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_tasks.errors import InvalidRequest
from router.core.errors import UnsupportedParameter
from router.gateway.openai_request import ROLE_ALIASES

#: Responses parameters honoured, by their OpenAI names (llamas extras included).
HONOURED = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
    "parallel_tool_calls", "text", "stream", "metadata", "user", "store",
    # llamas extras: more sampling, the bid, idempotency, deadline.
    "seed", "top_k", "min_p", "repeat_penalty", "multiplier", "fee", "reference", "deadline_s",
})
#: Extras passed to the chat body as they are.
PASSED = ("model", "temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty", "multiplier", "fee",
          "reference", "deadline_s", "stream")
#: Responses parameters accepted only at the value that asks for nothing.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "truncation": ("disabled",),
    "background": (False,),
    "include": ([],),
    "reasoning": ({},),
    "top_logprobs": (0,),
    "service_tier": ("auto", "default"),
}
#: Why a parameter is refused (shown in the error).
WHY = {
    "previous_response_id": "responses are not stored; send the whole conversation in input",
    "conversation": "conversations are not stored; send the whole conversation in input",
    "store": "responses are not stored; leave store out or send false",
    "background": "responses run in the foreground only",
    "reasoning": "the models served here do not reason in separate tokens",
    "include": "no extra output is available to include",
    "truncation": "input is never truncated; an input too long is refused",
    "top_logprobs": "log probabilities are served by /v1/chat/completions",
}
#: Roles a message item may have; ``developer`` is rendered as ``system``.
ROLES = ("user", "system", "developer", "assistant")
#: Content part types, by the role that may send them.
TEXT_PARTS = {"input_text", "output_text"}
#: Metadata limits (OpenAI's): keys, key length, value length.
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


def _refuse_unhonoured(body: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if name in HONOURED:
            continue
        if name in NEUTRAL:
            if _is_neutral(value, NEUTRAL[name]):
                continue
            raise UnsupportedParameter(name, WHY.get(name, f"only {NEUTRAL[name][0]!r} is supported"))
        raise UnsupportedParameter(name, WHY.get(name, "not a parameter this endpoint supports"))
    if body.get("store") is True:
        raise UnsupportedParameter("store", WHY["store"])
    if body.get("store") not in (None, False, True):
        raise InvalidRequest("store must be true or false")


def _text(where: str, content: Any) -> str:
    """A message's content: a string, or a list of ``input_text``/``output_text`` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be text or a list of input_text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in TEXT_PARTS:
            raise UnsupportedParameter(f"{where}[{j}]", f"only input_text and output_text parts are supported, "
                                                       f"got {kind!r}")
        extra = set(part) - {"type", "text", "annotations", "logprobs"}
        if extra or part.get("annotations") not in (None, []) or part.get("logprobs") not in (None, []):
            name = sorted(extra)[0] if extra else ("annotations" if part.get("annotations") else "logprobs")
            raise UnsupportedParameter(f"{where}[{j}].{name}", "text parts carry only their text")
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}[{j}].text must be text")
        texts.append(part["text"])
    return "".join(texts)


def _message(i: int, item: dict[str, Any]) -> dict[str, Any]:
    # id and status are what an earlier response's output item carries back.
    extra = set(item) - {"type", "role", "content", "id", "status"}
    if extra:
        raise UnsupportedParameter(f"input[{i}].{sorted(extra)[0]}", "message items carry a role and content")
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"input[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
    return {"role": ROLE_ALIASES.get(role, role), "content": _text(f"input[{i}].content", item.get("content"))}


def _function_call(i: int, item: dict[str, Any]) -> dict[str, Any]:
    """A ``function_call`` item: one call of an assistant's ``tool_calls``."""
    extra = set(item) - {"type", "call_id", "name", "arguments", "id", "status"}
    if extra:
        raise UnsupportedParameter(f"input[{i}].{sorted(extra)[0]}", "function_call items carry call_id, "
                                                                      "name and arguments")
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str) or (name != "arguments" and not item[name]):
            raise InvalidRequest(f"input[{i}].{name} must be text")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def _function_output(i: int, item: dict[str, Any]) -> dict[str, Any]:
    """A ``function_call_output`` item: the ``tool`` message that answers a call."""
    extra = set(item) - {"type", "call_id", "output", "id", "status"}
    if extra:
        raise UnsupportedParameter(f"input[{i}].{sorted(extra)[0]}", "function_call_output items carry call_id "
                                                                      "and output")
    if not isinstance(item.get("call_id"), str) or not item["call_id"]:
        raise InvalidRequest(f"input[{i}].call_id must be text")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": _text(f"input[{i}].output",
                                                                              item.get("output"))}


def messages(value: Any, instructions: Any) -> list[dict[str, Any]]:
    """The chat messages of ``input`` (a string or a list of items), after ``instructions`` as a system message."""
    out: list[dict[str, Any]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("instructions must be text")
        out.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        return [*out, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("input must be text or a non-empty list of items")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"input[{i}] must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(i, item))
        elif kind == "function_call":
            call = _function_call(i, item)
            last = out[-1] if out else None
            # Calls made together (parallel) are one assistant turn.
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(_function_output(i, item))
        else:
            raise UnsupportedParameter(f"input[{i}].type", f"only message, function_call and "
                                                           f"function_call_output items are supported, got {kind!r}")
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    """Responses' flat function tools as chat's ``{type, function: {...}}``."""
    if not isinstance(value, list):
        raise InvalidRequest("tools must be a list of function tools")
    out = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        if kind != "function":
            raise UnsupportedParameter(f"tools[{i}].type", f"only function tools are supported, got {kind!r}")
        extra = set(tool) - {"type", "name", "description", "parameters", "strict"}
        if extra:
            raise UnsupportedParameter(f"tools[{i}].{sorted(extra)[0]}", "function tools carry name, description, "
                                                                          "parameters and strict")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "name"}:
        return {"type": "function", "function": {"name": value["name"]}}
    raise UnsupportedParameter("tool_choice", "tool_choice is auto, none, required or {type: function, name}")


def _with_tools(body: Mapping[str, Any], chat: dict[str, Any]) -> None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` into the chat body."""
    tools = _tools(body["tools"]) if body.get("tools") is not None else []
    choice = _tool_choice(body.get("tool_choice"))
    if tools:
        chat["tools"] = tools
        if choice is not None:
            chat["tool_choice"] = choice
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    elif choice not in (None, "auto", "none"):
        # auto and none ask for nothing when there is no tool; anything else asks for a call.
        raise InvalidRequest("tool_choice asks for a tool call, but tools lists none")


def response_format(text: Any) -> dict[str, Any] | None:
    """Chat's ``response_format`` for Responses' ``text`` (``{format, verbosity}``)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidRequest("text must be an object with a format")
    extra = set(text) - {"format", "verbosity"}
    if extra:
        raise UnsupportedParameter(f"text.{sorted(extra)[0]}", "text carries format only")
    if text.get("verbosity") not in (None, "medium"):
        raise UnsupportedParameter("text.verbosity", "only 'medium' is supported")
    fmt = text.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        extra = set(fmt) - {"type", "name", "schema", "strict", "description"}
        if extra:
            raise UnsupportedParameter(f"text.format.{sorted(extra)[0]}", "json_schema carries name, schema, "
                                                                          "strict and description")
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("text.format.schema must be a JSON schema object")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                         if fmt.get(k) is not None}}
    raise InvalidRequest("text.format.type must be text, json_object or json_schema")


def check_metadata(value: Any) -> None:
    """``metadata``: at most 16 short string pairs (it is echoed back, never used)."""
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS or not all(
        isinstance(k, str) and len(k) <= MAX_METADATA_KEY_CHARS and isinstance(v, str)
        and len(v) <= MAX_METADATA_VALUE_CHARS for k, v in value.items()
    ):
        raise InvalidRequest(f"metadata must be at most {MAX_METADATA_KEYS} string pairs (keys up to "
                             f"{MAX_METADATA_KEY_CHARS} characters, values up to {MAX_METADATA_VALUE_CHARS})")


def chat_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The chat completions body a Responses body asks for; typed errors for what it cannot ask."""
    _refuse_unhonoured(body)
    if "input" not in body:
        raise InvalidRequest("input is required")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidRequest("user must be text")
    check_metadata(body.get("metadata"))
    chat: dict[str, Any] = {name: body[name] for name in PASSED if body.get(name) is not None}
    chat["messages"] = messages(body["input"], body.get("instructions"))
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    _with_tools(body, chat)
    fmt = response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    return chat


def openapi_body() -> dict[str, Any]:
    """The request body's schema for the API docs, built from the tables above."""
    schema = {"type": "object", "properties": {n: {} for n in sorted(HONOURED | set(NEUTRAL))},
              "required": ["input"], "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
