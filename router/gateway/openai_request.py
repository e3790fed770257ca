"""OpenAI request bodies → ``Submission``: what the gateway honours, and what it refuses.

Every parameter of OpenAI's chat and text completion APIs is either honoured,
accepted only at the value that asks for nothing (``best_of: 1``, ``echo:
false``), or refused with a 400 that names it — never silently dropped.
Values are then checked by the same ``request.check`` as the Python client's.

Chat ``tools``, ``tool_choice``, ``parallel_tool_calls``, assistant
``tool_calls`` and ``tool`` messages pass through in OpenAI's own shape
(``llama_tasks.tools`` says what they mean and checks them); an assistant
message with calls and a null content carries an empty one.

``n`` and log probabilities are honoured streamed and not: a stream carries
every choice's pieces with their ``index``, and their tokens' log probabilities.
A streamed chat that offers tools carries no log probabilities (its chunks
are parsed content and calls, not tokens): ``logprobs`` with it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF

from llama_tasks.errors import InvalidRequest, SamplingOutOfRange
from llama_tasks.registry import DEFAULT_MODEL
from router.core.errors import MalformedBody, UnsupportedParameter
from router.core.request import Submission

#: max_tokens of an OpenAI request that names none: longer than the Python client's
#: ``DEFAULT_MAX_TOKENS``, since chat applications rarely set it and expect a whole answer.
OPENAI_DEFAULT_MAX_TOKENS = 256
#: Most alternatives ``logprobs: N`` may ask for on /v1/completions (OpenAI's legacy limit).
MAX_LEGACY_LOGPROBS = 5

#: Parameters both endpoints honour, by their OpenAI names (llamas extras included).
COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "n", "logprobs",
    # llamas extras: more sampling, the bid, idempotency, deadline, constrained output.
    "top_k", "min_p", "repeat_penalty", "multiplier", "fee", "reference", "deadline_s",
    "grammar", "json_schema",
})
CHAT = COMMON | {"messages", "max_completion_tokens", "response_format", "top_logprobs", "tools", "tool_choice",
                 "parallel_tool_calls"}
COMPLETION = COMMON | {"prompt"}

#: OpenAI parameters accepted only at the value that asks for what we do anyway.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    # On /v1/completions alternatives are asked for with ``logprobs: N``.
    "top_logprobs": (0,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    # /v1/completions has no tools; chat completions honour them (an empty list is no tools).
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (False,),
    "store": (False,),
}
#: Why a parameter at another value is refused (shown in the error).
WHY = {
    "top_logprobs": "text completions ask for alternatives with logprobs: N (0 to 5)",
    "tools": "tool calls are offered on /v1/chat/completions",
    "tool_choice": "tool calls are offered on /v1/chat/completions",
    "functions": "the deprecated functions field is not supported; send tools",
    "function_call": "the deprecated function_call field is not supported; send tool_choice",
    "parallel_tool_calls": "tool calls are offered on /v1/chat/completions",
}
#: Role names OpenAI's newer models use for what the chat templates call "system".
ROLE_ALIASES = {"developer": "system"}
#: Fields a message of a role may carry besides role and content (``llama_tasks.tools``).
MESSAGE_EXTRAS: dict[Any, set[str]] = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}


def parse_body(body: Any) -> dict[str, Any]:
    """A parsed body (``limits.parse_json``'s) as a JSON object, or ``MalformedBody``."""
    if not isinstance(body, dict):
        raise MalformedBody("the body must be a JSON object")
    return body


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # By type as well as value: `true` is not `1`, and `0.0` is `0` only where listed.
    return value is None or any(type(value) is type(n) and value == n for n in neutral)


def _refuse_unhonoured(body: Mapping[str, Any], honoured: frozenset[str]) -> None:
    for name, value in body.items():
        if name in honoured:
            continue
        if name in NEUTRAL:
            if _is_neutral(value, NEUTRAL[name]):
                continue
            raise UnsupportedParameter(name, WHY.get(name, f"only {NEUTRAL[name][0]!r} is supported"))
        raise UnsupportedParameter(name, "not a parameter this endpoint supports")


def _text_content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"messages[{i}].content must be text or a list of text parts")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise UnsupportedParameter(f"messages[{i}].content[{j}]", f"only text parts are supported, got {kind!r}")
        if not isinstance(part["text"], str):
            raise InvalidRequest(f"messages[{i}].content[{j}].text must be text")
        parts.append(part["text"])
    return "".join(parts)


def _message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise InvalidRequest(f"messages[{i}] must be an object")
    role = m.get("role")
    allowed = {"role", "content"} | MESSAGE_EXTRAS.get(role, set())
    extra = set(m) - allowed
    if extra:
        raise UnsupportedParameter(f"messages[{i}].{sorted(extra)[0]}",
                                   f"a {role} message carries only {', '.join(sorted(allowed))}")
    out = {"role": ROLE_ALIASES.get(role, role) if isinstance(role, str) else role}
    # An assistant message that only calls tools has no content (OpenAI sends null).
    calls = m.get("tool_calls")
    out["content"] = "" if m.get("content") is None and calls else _text_content(i, m.get("content"))
    if calls is not None:
        out["tool_calls"] = calls
    if "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be a list of {role, content} objects")
    return [_message(i, m) for i, m in enumerate(messages)]


def _tools(body: Mapping[str, Any]) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as generation fields (an empty list: no tools)."""
    fields: dict[str, Any] = {}
    if body.get("tools") not in (None, []):
        fields["tools"] = body["tools"]
    if body.get("tool_choice") is not None and (fields or body["tool_choice"] != "none"):
        fields["tool_choice"] = body["tool_choice"]
    if body.get("parallel_tool_calls") is not None:
        fields["parallel_tool_calls"] = body["parallel_tool_calls"]
    return fields


def _response_format(fmt: Any) -> dict[str, Any]:
    """``grammar``/``json_schema`` fields for OpenAI's ``response_format``."""
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"grammar": JSON_GBNF}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object")
        return {"json_schema": spec["schema"]}
    raise InvalidRequest("response_format.type must be text, json_object or json_schema")


def _max_tokens(body: Mapping[str, Any]) -> Any:
    given = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    values = list(given.values())
    if len(values) == 2 and (type(values[0]) is not type(values[1]) or values[0] != values[1]):
        raise InvalidRequest("max_tokens and max_completion_tokens disagree; give one")
    return values[0] if values else OPENAI_DEFAULT_MAX_TOKENS


def _stream_options(body: Mapping[str, Any]) -> None:
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("stream must be true or false")
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
        options.get("include_usage", False), bool
    ):
        raise UnsupportedParameter("stream_options", "only include_usage (true or false) is supported")


def _legacy_logprobs(value: Any) -> dict[str, Any]:
    """``logprobs``/``top_logprobs`` fields for /v1/completions' ``logprobs: N`` (N alternatives)."""
    if value is None or value is False:
        return {}
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LEGACY_LOGPROBS:
        raise SamplingOutOfRange("logprobs", value, 0, MAX_LEGACY_LOGPROBS)
    return {"logprobs": True, "top_logprobs": value}


def _choices(body: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    """``n``, ``logprobs`` and ``top_logprobs`` as generation fields."""
    names = ("n", "top_logprobs") if chat else ("n",)
    fields = {name: body[name] for name in names if body.get(name) is not None}
    if chat:
        if body.get("logprobs") is not None:
            fields["logprobs"] = body["logprobs"]
    else:
        fields.update(_legacy_logprobs(body.get("logprobs")))
    return fields


def submission(body: Mapping[str, Any], headers: Mapping[str, str], chat: bool) -> Submission:
    """The ``Submission`` an OpenAI-style body asks for (checked); typed errors otherwise."""
    _refuse_unhonoured(body, CHAT if chat else COMPLETION)
    _stream_options(body)
    fields: dict[str, Any] = {
        name: body[name]
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "fee", "multiplier",
                     "reference", "deadline_s", "grammar", "json_schema")
        if body.get(name) is not None
    }
    fields.update(_choices(body, chat))
    fields["model"] = body.get("model") if body.get("model") is not None else DEFAULT_MODEL
    fields["max_tokens"] = _max_tokens(body)
    fields["stop"] = body.get("stop")
    if chat:
        if "messages" not in body:
            raise InvalidRequest("messages is required")
        fields["messages"] = _messages(body["messages"])
        fields.update(_tools(body))
        if body.get("stream") and fields.get("logprobs") and fields.get("tools") and \
                fields.get("tool_choice") != "none":
            raise UnsupportedParameter("logprobs", "log probabilities are not streamed with tools: "
                                                   "drop stream or logprobs")
        constrained = _response_format(body.get("response_format"))
        if constrained and ("grammar" in fields or "json_schema" in fields):
            raise InvalidRequest("give response_format or grammar/json_schema, not both")
        fields.update(constrained)
    else:
        if not isinstance(body.get("prompt"), str):
            raise InvalidRequest("prompt must be one string")
        fields["prompt"] = body["prompt"]
    header_bid(fields, headers)
    return Submission.from_dict(fields)


def header_bid(fields: dict[str, Any], headers: Mapping[str, str]) -> None:
    """The bid from ``X-Llamas-Multiplier`` / ``X-Llamas-Fee`` where the body named none, for clients
    that cannot add body fields (every endpoint that is paid takes it the same way)."""
    if "multiplier" not in fields and headers.get("x-llamas-multiplier") is not None:
        fields["multiplier"] = headers["x-llamas-multiplier"]
    if "fee" not in fields and headers.get("x-llamas-fee") is not None:
        try:
            fields["fee"] = int(headers["x-llamas-fee"])
        except ValueError:
            raise InvalidRequest(f"X-Llamas-Fee must be an integer, got {headers['x-llamas-fee']!r}") from None


def openapi_body(chat: bool) -> dict[str, Any]:
    """The request body's schema for the API docs, built from the tables above."""
    names = sorted((CHAT if chat else COMPLETION) | set(NEUTRAL))
    required = ["messages"] if chat else ["prompt"]
    schema = {"type": "object", "properties": {n: {} for n in names}, "required": required,
              "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
