"""The tool-call parser: the same answer however the output is cut into pieces, and never an invalid call."""

from __future__ import annotations

import codecs
import json
from typing import Any

import pytest

from llama_tasks import tool_calls
from llama_tasks.tool_calls import Arguments, CallStart, Content, ToolCallParser

WEATHER = {"get_weather": {"parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
}}, "now": {"parameters": {"type": "object", "properties": {}}}}


def call(name: str, arguments: Any) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}</tool_call>"


def parser() -> ToolCallParser:
    return ToolCallParser(WEATHER, "job-1")


def whole(text: str, finish: str = "stop") -> dict[str, Any]:
    return tool_calls.parse(parser(), text, finish)


def streamed(pieces: list[bytes]) -> tuple[list[Any], tuple[str, list[dict[str, Any]]]]:
    """Feed UTF-8 ``pieces`` as the stream would (decoded as they come); the events and what they assemble to."""
    p, decoder, events = parser(), codecs.getincrementaldecoder("utf-8")(), []
    for piece in pieces:
        events += p.feed(decoder.decode(piece))
    events += p.feed(decoder.decode(b"", final=True)) + p.close()
    return events, tool_calls.assemble(events)


OUTPUTS = [
    # one call, nothing else
    call("get_weather", {"city": "Paris"}),
    # text before, two calls separated as the grammar allows, a non-ASCII argument
    "Let me look. " + call("get_weather", {"city": "Zürich", "unit": "celsius"}) + "\n" + call("now", {}),
    # no call at all, with whitespace and something that looks like the start of a call
    "  plain answer <tool and <tool_cal, nothing more \n",
    # a call cut short by max_tokens
    "ok " + call("get_weather", {"city": "Paris"})[:30],
    # arguments that do not validate (days below its minimum), then a valid call
    call("get_weather", {"city": "Paris", "days": 0}) + call("get_weather", {"city": "Oslo", "days": 2}),
    # an unknown function, and a body that is not JSON
    call("launch", {}) + " <tool_call>{nope</tool_call>",
    "",
]


@pytest.mark.parametrize("text", OUTPUTS)
def test_every_split_into_two_or_three_pieces_gives_the_whole_answer(text: str) -> None:
    expected = whole(text)
    data = text.encode("utf-8")
    splits = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    # Three pieces at every pair of byte offsets of the short ones (every byte of the long ones is in the two-piece set).
    if len(data) <= 90:
        splits += [[data[:i], data[i:j], data[j:]] for i in range(len(data) + 1) for j in range(i, len(data) + 1)]
    splits.append([bytes([b]) for b in data])
    for pieces in splits:
        _, (content, calls) = streamed(pieces)
        assert calls == expected["tool_calls"], pieces
        assert content == (expected["content"] or ""), pieces


def test_a_plain_answer_comes_out_exactly_as_written() -> None:
    for text in OUTPUTS[2:4] + ["x", "  ", "<", "<tool_call"]:
        result = whole(text, "length")
        assert result == {"content": text, "tool_calls": [], "finish_reason": "length"}


def test_calls_carry_openai_shape_and_text_around_them_is_content() -> None:
    result = whole(OUTPUTS[1])
    assert result["content"] == "Let me look."
    assert result["finish_reason"] == "tool_calls"
    first, second = result["tool_calls"]
    assert first["type"] == "function" and first["function"]["name"] == "get_weather"
    assert json.loads(first["function"]["arguments"]) == {"city": "Zürich", "unit": "celsius"}
    assert second["function"] == {"name": "now", "arguments": "{}"}
    assert first["id"].startswith("call_") and first["id"] != second["id"]
    # The ids depend on the job, the choice and the position only: every channel agrees.
    assert first["id"] == tool_calls.call_id("job-1", 0, 0) == whole(OUTPUTS[1])["tool_calls"][0]["id"]
    assert ToolCallParser(WEATHER, "job-1", 1).feed(OUTPUTS[0])[0].id != first["id"]


def test_a_call_with_no_text_around_it_has_null_content() -> None:
    assert whole(OUTPUTS[0])["content"] is None


def test_invalid_calls_are_never_calls_but_the_text_they_are() -> None:
    cut = whole(OUTPUTS[3], "length")
    assert cut == {"content": OUTPUTS[3], "tool_calls": [], "finish_reason": "length"}
    invalid_then_valid = whole(OUTPUTS[4])
    assert [json.loads(c["function"]["arguments"]) for c in invalid_then_valid["tool_calls"]] == [
        {"city": "Oslo", "days": 2}]
    assert invalid_then_valid["content"] == call("get_weather", {"city": "Paris", "days": 0})
    unknown = whole(OUTPUTS[5])
    assert unknown["tool_calls"] == [] and unknown["content"] == OUTPUTS[5] and unknown["finish_reason"] == "stop"


def test_a_call_cut_by_the_token_limit_keeps_length_as_finish_reason() -> None:
    text = call("now", {}) + "\n<tool_call>{\"na"
    result = whole(text, "length")
    assert len(result["tool_calls"]) == 1 and result["finish_reason"] == "length"


def test_the_stream_holds_back_only_what_may_start_a_call() -> None:
    p = parser()
    assert p.feed("Hello <tool") == [Content("Hello")]
    assert p.feed("box> there") == [Content(" <toolbox> there")]
    assert p.close() == []


def test_a_streamed_call_names_itself_first_then_sends_its_arguments_in_pieces() -> None:
    arguments = {"city": "Llanfairpwllgwyngyll", "unit": "celsius", "days": 3}
    events, _ = streamed([call("get_weather", arguments).encode()])
    start, *pieces = events
    assert start == CallStart(0, tool_calls.call_id("job-1", 0, 0), "get_weather")
    assert len(pieces) > 1 and all(isinstance(p, Arguments) and p.index == 0 for p in pieces)
    assert json.loads("".join(p.text for p in pieces)) == arguments


def test_no_parser_for_a_job_that_offers_no_tools() -> None:
    tools = [{"type": "function", "function": {"name": "now"}}]
    assert tool_calls.parser_for({"tools": None}, "j") is None
    assert tool_calls.parser_for({"tools": tools, "tool_choice": "none"}, "j") is None
    named = tool_calls.parser_for({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "now"}}}, "j")
    assert named is not None and set(named.functions) == {"now"}
