"""``POST /v1/responses`` in process: the official ``openai`` client against the real gateway, herder core,
SQLite ledger and Redis, with the scripted worker of ``test_openai_choices`` answering each job.

What is proved here: the Responses body becomes the chat submission it means
(read back from the job's record), the answer comes back in the Responses
shapes (plain and as typed events), charged exactly, and bad input is a 4xx
in OpenAI's error shape with nothing held.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

from router.core import ledger
from router.core.models import JobRow
from router.gateway import responses_request
from router.gateway.responses_shapes import ResponseShapes
from tests.router import test_openai_choices as choices
from tests.router.test_openai_choices import DEPOSIT, MODEL, ScriptedGateway

#: The scripted gateway of the chat tests, as this module's fixture.
gw = choices.gw


def sdk(gw: ScriptedGateway) -> openai.OpenAI:
    # The gateway's TestClient is an httpx client: the SDK speaks to the app in process.
    return openai.OpenAI(base_url="http://testserver/v1", api_key=gw.key, max_retries=0, http_client=gw.http)


def said(text: str, finish: str = "stop", tokens: int = 3) -> dict[str, Any]:
    return {"cached_tokens": 0, "choices": [
        {"index": 0, "text": text, "finish_reason": finish, "completion_tokens": tokens, "logprobs": None}]}


def asked(gw: ScriptedGateway) -> dict[str, Any]:
    """The generation the job asks of its worker, as the herder recorded it."""
    return dict(json.loads(gw.row().request))


def untouched(gw: ScriptedGateway) -> bool:
    with gw.svc.sessions.begin() as s:
        return (s.query(JobRow).count() == 0 and ledger.check(s) == []
                and ledger.balance(s, ledger.account_by_key(s, gw.key)) == DEPOSIT)


def test_a_string_input_is_one_user_message_answered_as_a_response(gw: ScriptedGateway) -> None:
    gw.script = said("Hello there!")
    reply = sdk(gw).responses.create(model=MODEL, input="Greet me.", instructions="Be brief.",
                                     max_output_tokens=12, temperature=0.5, metadata={"ticket": "7"})
    row = gw.row()
    job = asked(gw)
    assert job["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet me."}]
    assert job["max_tokens"] == 12 and job["temperature"] == 0.5 and job["n"] == 1
    assert reply.id == f"resp_{row.id}" and reply.status == "completed" and reply.output_text == "Hello there!"
    [message] = reply.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert [(p.type, p.text) for p in message.content] == [("output_text", "Hello there!")]
    assert reply.metadata == {"ticket": "7"} and reply.instructions == "Be brief." and reply.max_output_tokens == 12
    usage = reply.usage.model_dump()
    assert usage["input_tokens"] == row.prompt_tokens and usage["output_tokens"] == 3
    assert usage["total_tokens"] == row.prompt_tokens + 3
    assert usage["charged"] == row.charged and usage["charged"] + usage["refunded"] == usage["offered"] == row.offered
    assert gw.balance() == DEPOSIT - row.charged


def test_items_become_the_chat_conversation_they_mean(gw: ScriptedGateway) -> None:
    gw.script = said("Blue.")
    sdk(gw).responses.create(model=MODEL, input=[
        {"role": "developer", "content": "Answer in one word."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Sky "},
                                                       {"type": "input_text", "text": "colour?"}]},
        # An earlier answer sent back as the output item it was.
        {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
        {"role": "user", "content": "And the sea?"},
    ])
    assert asked(gw)["messages"] == [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And the sea?"}]


def test_a_json_schema_text_format_constrains_the_job(gw: ScriptedGateway) -> None:
    schema = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["up", "down"]}},
              "required": ["mood"], "additionalProperties": False}
    gw.script = said('{"mood": "up"}')
    reply = sdk(gw).responses.create(model=MODEL, input="How is the market?",
                                     text={"format": {"type": "json_schema", "name": "mood", "schema": schema,
                                                      "strict": True}})
    assert asked(gw)["json_schema"] == schema
    assert json.loads(reply.output_text) == {"mood": "up"}
    assert reply.text.format.type == "json_schema"


def test_json_object_asks_for_json(gw: ScriptedGateway) -> None:
    gw.script = said("{}")
    sdk(gw).responses.create(model=MODEL, input="JSON please", text={"format": {"type": "json_object"}})
    assert asked(gw)["grammar"]  # the JSON grammar


def test_an_answer_cut_by_max_output_tokens_is_incomplete(gw: ScriptedGateway) -> None:
    gw.script = said("Once upon", finish="length", tokens=2)
    reply = sdk(gw).responses.create(model=MODEL, input="Tell a story.", max_output_tokens=2)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output[0].status == "incomplete" and reply.output_text == "Once upon"


def test_a_streamed_response_sends_the_typed_events_in_order(gw: ScriptedGateway) -> None:
    gw.script = said("Hello there!")
    gw.pieces = [(0, "Hello", None), (0, " there", None), (0, "!", None)]
    events = list(sdk(gw).responses.create(model=MODEL, input="Greet me.", stream=True))
    row = gw.row()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello there!"
    assert events[7].text == "Hello there!" and events[0].response.status == "in_progress"
    done = events[-1].response
    assert done.id == f"resp_{row.id}" and done.output_text == "Hello there!"
    assert done.usage.output_tokens == 3 and done.usage.model_dump()["charged"] == row.charged
    assert gw.balance() == DEPOSIT - row.charged


def test_the_sdks_stream_helper_assembles_the_final_response(gw: ScriptedGateway) -> None:
    gw.script = said("Hello there!")
    gw.pieces = [(0, "Hello", None), (0, " there!", None)]
    with sdk(gw).responses.stream(model=MODEL, input="Greet me.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello there!"
    assert final.id == f"resp_{gw.row().id}"


class Mood(BaseModel):
    mood: Literal["up", "down"]


def test_the_sdks_parse_helper_sends_a_strict_schema_and_parses_the_answer(gw: ScriptedGateway) -> None:
    gw.script = said('{"mood": "down"}')
    reply = sdk(gw).responses.parse(model=MODEL, input="How is the market?", text_format=Mood)
    assert reply.output_parsed == Mood(mood="down")
    assert asked(gw)["json_schema"]["properties"]["mood"]["enum"] == ["up", "down"]


def test_the_raw_stream_names_each_event_on_its_event_line(gw: ScriptedGateway) -> None:
    gw.script = said("Hi")
    gw.pieces = [(0, "Hi", None)]
    reply = gw.http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True},
                         headers={"Authorization": f"Bearer {gw.key}"})
    assert reply.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in reply.text.split("\n\n") if b]
    for block in blocks:
        event, data = block.split("\n")
        assert event.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"]
    assert "[DONE]" not in reply.text


@pytest.mark.parametrize("body,status,param", [
    ({"store": True}, 400, "store"),
    ({"previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     400, "input[0].content[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, 422, None),
    ({"input": []}, 422, None),
    ({"input": 7}, 422, None),
    ({"input": None}, 422, None),
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"tool_choice": "required"}, 422, None),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 422, None),
    ({"text": {"format": {"type": "yaml"}}}, 422, None),
    ({"reasoning": {"effort": "high"}}, 400, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, 400, "include"),
    ({"background": True}, 400, "background"),
    ({"truncation": "auto"}, 400, "truncation"),
    ({"n": 2}, 400, "n"),
    ({"max_tokens": 5}, 400, "max_tokens"),
    ({"metadata": {"k": 1}}, 422, None),
    ({"max_output_tokens": 0}, 422, None),
    ({"temperature": 9}, 422, "temperature"),
    ({"input": "hi", "model": "nope"}, 404, None),
])
def test_bad_input_is_refused_in_openai_shape_with_nothing_held(gw: ScriptedGateway, body: dict, status: int,
                                                                param: str | None) -> None:
    reply = gw.http.post("/v1/responses", json={"model": MODEL, "input": "hi", **body},
                         headers={"Authorization": f"Bearer {gw.key}"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and error["code"]
    if param is not None:
        assert error["param"] == param, error
    assert untouched(gw)


def test_a_missing_input_is_refused_by_name(gw: ScriptedGateway) -> None:
    reply = gw.http.post("/v1/responses", json={"model": MODEL}, headers={"Authorization": f"Bearer {gw.key}"})
    assert reply.status_code == 422 and "input" in reply.json()["error"]["message"]
    assert untouched(gw)


def test_the_sdk_sees_a_refusal_as_its_own_error_type(gw: ScriptedGateway) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(gw).responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert info.value.body["param"] == "previous_response_id"
    assert untouched(gw)


# --- function calls: the translation both ways ------------------------------------------------

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": True}


def test_function_call_items_become_assistant_tool_calls_and_tool_messages() -> None:
    chat = responses_request.chat_body({"model": MODEL, "tools": [WEATHER], "tool_choice": {
        "type": "function", "name": "get_weather"}, "parallel_tool_calls": False, "input": [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "get_weather",
         "arguments": '{"city":"Oslo"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C, sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": "4C, snow"},
    ]})
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER["parameters"],
        "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "4C, snow"},
    ]


def test_without_tools_auto_and_none_tool_choice_ask_for_nothing() -> None:
    for choice in ("auto", "none"):
        assert "tool_choice" not in responses_request.chat_body({"input": "hi", "tool_choice": choice})


def test_a_choice_with_tool_calls_becomes_function_call_items() -> None:
    shapes = ResponseShapes("j1", 0, {"model": MODEL})
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    resp = {"status": "done", "prompt_tokens": 10, "completion_tokens": 8, "offered": 30, "charged": 19,
            "refunded": 11, "choices": [{"index": 0, "text": "", "finish_reason": "tool_calls", "tool_calls": calls}]}
    final = shapes.final(resp)
    assert final["status"] == "completed"
    assert final["output"] == [{"type": "function_call", "id": "fc_j1_0", "call_id": "call_a", "name": "get_weather",
                                "arguments": '{"city":"Oslo"}', "status": "completed"}]
    # Streamed: the call's item opens, its arguments arrive, it closes; then the response completes.
    lines = shapes.closing(resp)
    kinds = [json.loads(line.split("\ndata: ")[1])["type"] for line in lines]
    assert kinds == ["response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]


def test_a_failed_job_streams_response_failed_with_the_status_a_plain_request_gets() -> None:
    shapes = ResponseShapes("j2", 0, {"model": MODEL})
    line = shapes.failed({"status": "failed", "job_id": "j2", "error": "WorkerLost", "message": "lost"})
    doc = json.loads(line.split("\ndata: ")[1])
    assert doc["type"] == "response.failed" and doc["response"]["status"] == "failed"
    assert doc["response"]["error"]["status"] == 503 and doc["response"]["error"]["retry_after_s"] == 5


def test_a_function_call_round_trip_through_the_gateway(gw: ScriptedGateway) -> None:
    # The worker returns the model's text; the herder parses the call out of it (``views.response``).
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    gw.script = {"cached_tokens": 0, "choices": [{"index": 0, "text": text, "finish_reason": "stop",
                                                  "completion_tokens": 9, "logprobs": None}]}
    first = sdk(gw).responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required")
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
        "city": "Oslo"}
    gw.script = said("It is 4C and snowing in Oslo.")
    second = sdk(gw).responses.create(model=MODEL, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Oslo?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "4C, snow"}])
    assert second.output_text == "It is 4C and snowing in Oslo."
