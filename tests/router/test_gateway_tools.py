"""Tools at the HTTP gateway: honoured fields reach the job; bad tools are a 400 in OpenAI's shape, nothing held.

In process, with the fixture of ``test_gateway_input`` (the real gateway,
herder core and SQLite ledger, a recording sender and no worker).
"""

from __future__ import annotations

import json

import pytest

from router.core.models import JobRow
from tests.router import test_gateway_input
from tests.router.test_gateway_input import Gateway, assert_openai_error, chat, completion

gw = test_gateway_input.gw  # the same fixture

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
LOOP = [{"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


def test_tools_and_a_tool_loop_conversation_reach_the_job(gw: Gateway) -> None:
    sub = gw.admit_only(chat(messages=LOOP, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    job = gw.last_job()
    assert job["tools"] == [WEATHER] == sub.tools
    assert job["tool_choice"] == "required" and job["parallel_tool_calls"] is False
    assert job["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert job["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_the_rendered_tools_are_quoted_as_prompt_tokens(gw: Gateway) -> None:
    def held(body: dict) -> int:
        gw.admit_only(body)
        with gw.svc.sessions.begin() as s:
            row = s.query(JobRow).order_by(JobRow.seq.desc()).first()
            assert row is not None
            return row.prompt_tokens
    plain = held(chat())
    offered = held(chat(tools=[WEATHER]))
    assert offered > plain + 50
    assert held(chat(tools=[WEATHER], tool_choice="none")) == plain  # none: nothing offered, nothing rendered


def test_empty_tools_and_choices_that_ask_nothing_are_neutral(gw: Gateway) -> None:
    gw.admit_only(chat(tools=[], tool_choice="none", parallel_tool_calls=True))
    assert gw.last_job()["tools"] is None


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [WEATHER], "messages": [{"role": "user", "content": "hi"},
                                       {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    # A valid JSON schema whose reference the grammar cannot follow: refused at admission.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/x.json"}}}}}]}, "tools"),
])
def test_bad_tools_are_400_naming_the_field_with_nothing_held(gw: Gateway, fields: dict, param: str) -> None:
    error = assert_openai_error(gw.post(chat(**fields)), 400, "BadTools", param)
    assert error["type"] == "invalid_request_error"
    assert gw.untouched()


@pytest.mark.parametrize("fields,param", [
    ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "tool", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_tool_fields_on_the_wrong_role_are_refused_by_name(gw: Gateway, fields: dict, param: str) -> None:
    assert_openai_error(gw.post(chat(**fields)), 400, "UnsupportedParameter", param)
    assert gw.untouched()


def test_text_completions_offer_no_tools(gw: Gateway) -> None:
    assert_openai_error(gw.post(completion(tools=[WEATHER]), path="/v1/completions"), 400, "UnsupportedParameter",
                        "tools")
    assert gw.untouched()


def test_the_api_docs_list_the_tool_fields(gw: Gateway) -> None:
    schema = gw.http.get("/openapi.json").json()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(body["properties"])
    assert json.dumps(body)


def test_streamed_logprobs_with_tools_are_refused_by_name(gw: Gateway) -> None:
    # A tool-offering stream sends parsed content and calls, not tokens: no place for their log probabilities.
    assert_openai_error(gw.post(chat(tools=[WEATHER], stream=True, logprobs=True)), 400, "UnsupportedParameter",
                        "logprobs")
    assert gw.untouched()
    gw.admit_only(chat(tools=[WEATHER], logprobs=True))  # not streamed: honoured
    gw.admit_only(chat(tools=[WEATHER], tool_choice="none", stream=True, logprobs=True))  # nothing offered
