"""How offered tools and a conversation's tool calls reach the model's prompt.

A model whose GGUF chat template knows tools (it uses the ``tools``
variable: Qwen, Hermes, Llama 3.1 and others) gets them through its
template, with assistant ``tool_calls`` (arguments as objects) and ``tool``
messages as Hugging Face's templates expect them. A template that does not
(the bundled SmolLM2's) gets plain messages in one format:

- the offered functions as a system block (``tools_block``): one JSON line
  per function (``name``, ``description``, ``parameters``) between
  ``<tools>`` tags, and how to call them; appended to the first message when
  it is a system message, otherwise a system message of its own before it;
- an assistant message's calls as ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``,
  one right after another, on a line after its text: exactly what the model is asked to write;
- ``tool`` results (consecutive ones together) as one user message of
  ``<tool_response>{"name": …, "content": …}</tool_response>`` lines.

With ``tool_choice: "none"`` no tools are rendered (the model is not told of
them and cannot call them); earlier calls and results still are. Both the
herder's quote and the worker render through ``engine.render``, so the
tool definitions are counted, and charged, as prompt tokens exactly.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_tasks import tools
from llama_tasks.job import Generation

#: A chat template that mentions this variable renders tools itself.
TEMPLATE_TOOLS = re.compile(r"\btools\b")

PREAMBLE = ("# Tools\n\nYou may call functions to answer. The functions, one JSON object per line:\n<tools>\n")
HOW = ("</tools>\n\nTo call a function, reply with\n"
       f'{tools.OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}{tools.CLOSE}\n'
       "Results come back in <tool_response></tool_response> blocks.")


def handles_tools(template: str) -> bool:
    """Whether a chat template renders ``tools`` itself."""
    return TEMPLATE_TOOLS.search(template) is not None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def tools_block(job: Generation) -> str | None:
    """The system block that offers ``job``'s tools, or None when it offers none."""
    mode = tools.choice(job.tool_choice, job.tools)
    if mode is None:
        return None
    lines = [_dumps({"name": name, "description": fn["description"], "parameters": fn["parameters"]})
             for name, fn in tools.functions(job.tools).items()]
    if mode == "auto":
        rule = "Call a function only when it helps; otherwise answer in plain text."
    elif mode == "required":
        rule = "You must call a function now."
    else:
        rule = f"You must call {mode} now."
    many = ("You may make several calls, one after another." if job.parallel_tool_calls
            else "Make at most one call.")
    return PREAMBLE + "\n".join(lines) + "\n" + HOW + "\n" + rule + " " + many


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    return f"{tools.OPEN}{_dumps({'name': name, 'arguments': arguments})}{tools.CLOSE}"


def _arguments(call: dict[str, Any]) -> Any:
    return json.loads(call["function"]["arguments"])


def plain_messages(job: Generation) -> list[dict[str, str]]:
    """``job``'s conversation as ``{role, content}`` messages in the documented format (no template tools)."""
    messages = job.messages or []
    names = tools.call_names(messages)
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "tool":
            line = ("<tool_response>" + _dumps({"name": names.get(m.get("tool_call_id") or "", ""),
                                                "content": content}) + "</tool_response>")
            if out and out[-1].get("tool"):
                out[-1]["content"] += "\n" + line
            else:
                out.append({"role": "user", "content": line, "tool": "1"})
            continue
        calls = [call_text(c["function"]["name"], _arguments(c)) for c in m.get("tool_calls") or []]
        if calls:
            content = (content + "\n" if content else "") + tools.SEPARATOR.join(calls)
        out.append({"role": m["role"], "content": content})
    block = tools_block(job)
    if block is not None:
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + block
        else:
            out.insert(0, {"role": "system", "content": block})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def template_messages(job: Generation) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``(messages, tools)`` for a template that renders tools itself, as Hugging Face's templates take them."""
    messages = job.messages or []
    names = tools.call_names(messages)
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "tool", "tool_call_id": m["tool_call_id"],
                        "name": names.get(m["tool_call_id"], ""), "content": m.get("content") or ""})
        elif m.get("tool_calls"):
            out.append({"role": "assistant", "content": m.get("content") or "",
                        "tool_calls": [{"id": c["id"], "type": "function",
                                        "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                                       for c in m["tool_calls"]]})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    offered = tools.offered(job.tool_choice, job.tools)
    if not offered:
        return out, None
    return out, [t for t in job.tools or [] if t["function"]["name"] in offered]
