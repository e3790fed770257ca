"""A streamed tool-offering chat in SSE chunks: the gateway's ``events`` over a scripted token stream.

No processes: the job is a stand-in that streams a fixed text in pieces and
then answers with the response the herder builds for it; the chunks must
reassemble to exactly that response's message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio

from llama_tasks import tool_calls
from router.gateway import completions, openai_shapes

WEATHER = {"get_weather": {"parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
TEXT = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Llanfairpwllgwyngyll"}}</tool_call>'


class ScriptedJob:
    """Streams ``pieces`` (with a restart after the first ``restart_after``), then answers ``response``."""

    def __init__(self, pieces: list[str], response: dict[str, Any], restart_after: int = 0) -> None:
        self.pieces, self.response, self.restart_after = pieces, response, restart_after

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        if self.restart_after:
            for piece in self.pieces[:self.restart_after]:
                yield {"event": "token", "text": piece, "index": 0, "logprobs": None}
            yield {"event": "restart", "attempt": "2", "index": 0}
        for piece in self.pieces:
            yield {"event": "token", "text": piece, "index": 0, "logprobs": None}

    async def wait_response(self) -> dict[str, Any]:
        return self.response

    async def cancel_on_disconnect(self) -> None:
        raise AssertionError("the stream ran to its end")


def response(text: str) -> dict[str, Any]:
    parsed = tool_calls.parse(tool_calls.ToolCallParser(WEATHER, "job-7"), text, "stop")
    choice = {"index": 0, "text": text, "logprobs": None, **parsed}
    return {"status": "done", "finish_reason": choice["finish_reason"], "choices": [choice],
            "prompt_tokens": 9, "completion_tokens": 30, "charged": 50, "offered": 60, "refunded": 10}


def stream(job: ScriptedJob) -> list[dict[str, Any]]:
    shapes = openai_shapes.Shapes("job-7", "smollm2", True, 0)

    async def collect() -> list[str]:
        parsers: list[tool_calls.ToolCallParser | None] = [tool_calls.ToolCallParser(WEATHER, "job-7")]
        return [line async for line in completions.events(job, shapes, parsers, True)]  # type: ignore[arg-type]

    lines = anyio.run(collect)
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def reassemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    restarted = [i for i, c in enumerate(chunks) if openai_shapes.RESTART_FIELD in c]
    chunks = chunks[restarted[-1] + 1:] if restarted else chunks
    content, calls = "", {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            content += choice["delta"].get("content") or ""
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"function": {"arguments": ""}})
                if "id" in delta:
                    call.update(id=delta["id"], type=delta["type"])
                    call["function"]["name"] = delta["function"]["name"]
                call["function"]["arguments"] += delta["function"]["arguments"]
    return {"role": "assistant", "content": content or None, "tool_calls": [calls[i] for i in sorted(calls)]}


def test_every_split_of_the_stream_reassembles_to_the_whole_message() -> None:
    whole = openai_shapes.Shapes("job-7", "smollm2", True, 0).final(response(TEXT)["choices"], {})
    message = whole["choices"][0]["message"]
    for cut in range(len(TEXT) + 1):
        chunks = stream(ScriptedJob([TEXT[:cut], TEXT[cut:]], response(TEXT)))
        assert reassemble(chunks) == message, cut
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_the_name_comes_first_then_the_arguments_in_pieces() -> None:
    chunks = stream(ScriptedJob(list(TEXT), response(TEXT)))
    deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert deltas[0]["id"] == tool_calls.call_id("job-7", 0, 0) and deltas[0]["function"]["name"] == "get_weather"
    assert deltas[0]["function"]["arguments"] == "" and len(deltas) > 2
    assert all(set(d) == {"index", "function"} and d["index"] == 0 for d in deltas[1:])
    # Nothing of the call's markup ever reached the content.
    assert "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"]) == "Checking."


def test_a_restarted_stream_parses_afresh() -> None:
    chunks = stream(ScriptedJob([TEXT[:40], TEXT[40:]], response(TEXT), restart_after=2))
    whole = openai_shapes.Shapes("job-7", "smollm2", True, 0).final(response(TEXT)["choices"], {})
    assert reassemble(chunks) == whole["choices"][0]["message"]


def test_an_answer_without_a_call_streams_as_plain_text() -> None:
    text = "No tools needed <tool here."
    chunks = stream(ScriptedJob(list(text), response(text)))
    assert reassemble(chunks) == {"role": "assistant", "content": text, "tool_calls": []}


def test_every_choice_of_a_stream_is_parsed_on_its_own() -> None:
    # Two choices interleaved piece by piece: each one's calls come out under its own index.
    other = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    texts = [TEXT, other]
    pieces = [(i, text[k:k + 5]) for k in range(0, max(map(len, texts)), 5) for i, text in enumerate(texts)
              if text[k:k + 5]]

    class TwoChoices(ScriptedJob):
        async def follow(self) -> AsyncIterator[dict[str, Any]]:
            for index, piece in pieces:
                yield {"event": "token", "text": piece, "index": index, "logprobs": None}

    choices = []
    for index, text in enumerate(texts):
        parsed = tool_calls.parse(tool_calls.ToolCallParser(WEATHER, "job-7", index), text, "stop")
        choices.append({"index": index, "text": text, "logprobs": None, **parsed})
    resp = {"status": "done", "finish_reason": "tool_calls", "choices": choices, "prompt_tokens": 9,
            "completion_tokens": 60, "charged": 80, "offered": 90, "refunded": 10}
    shapes = openai_shapes.Shapes("job-7", "smollm2", True, 0)

    async def collect() -> list[str]:
        parsers: list[tool_calls.ToolCallParser | None] = [tool_calls.ToolCallParser(WEATHER, "job-7", i)
                                                           for i in range(2)]
        job = TwoChoices([], resp)
        return [line async for line in completions.events(job, shapes, parsers, True)]  # type: ignore[arg-type]

    lines = anyio.run(collect)
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for index, choice in enumerate(choices):
        own = [{**c, "choices": [x for x in c["choices"] if x["index"] == index]} for c in chunks]
        message = reassemble(own)
        assert message["tool_calls"] == choice["tool_calls"] and message["content"] == choice["content"]
