"""Tool calls in OpenAI's response shape, charged for the text the model wrote (in process, scripted worker).

Uses the fixture of ``test_openai_choices``: the real gateway, herder core,
SQLite ledger and Redis, with a worker that answers with a scripted result.
"""

from __future__ import annotations

import json

from tests.router import test_openai_choices
from tests.router.test_openai_choices import ScriptedGateway

gw = test_openai_choices.gw  # the same fixture

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


def ask(gw: ScriptedGateway, text: str, finish: str, tokens: int, **fields: object) -> dict:
    gw.script = {"choices": [{"index": 0, "text": text, "finish_reason": finish, "completion_tokens": tokens}]}
    return gw.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather in Oslo?"}],
                                            "max_tokens": 40, "tools": [WEATHER], **fields})


def test_a_call_comes_back_as_tool_calls_charged_for_the_text_written(gw: ScriptedGateway) -> None:
    before = gw.balance()
    reply = ask(gw, CALL_TEXT, "stop", 21)
    row = gw.row()
    [choice] = reply["choices"]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert choice["message"]["content"] is None and choice["message"]["role"] == "assistant"
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    # The tool definitions are prompt tokens, the call's text completion tokens, as the worker signed them.
    charged = 5 + 3 * (row.prompt_tokens + 21)
    assert reply["usage"]["completion_tokens"] == 21 and reply["usage"]["charged"] == charged == row.charged
    assert before - gw.balance() == charged


def test_an_answer_without_a_call_is_plain_content(gw: ScriptedGateway) -> None:
    reply = ask(gw, "It is sunny in Oslo.", "stop", 6)
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny in Oslo."}
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_a_call_that_does_not_validate_is_text_never_a_call(gw: ScriptedGateway) -> None:
    bad = '<tool_call>{"name": "get_weather", "arguments": {"town": "Oslo"}}</tool_call>'
    reply = ask(gw, bad, "stop", 20)
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": bad}
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_tool_choice_none_offers_nothing_and_parses_nothing(gw: ScriptedGateway) -> None:
    reply = ask(gw, CALL_TEXT, "stop", 21, tool_choice="none")
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": CALL_TEXT}


def test_the_job_document_carries_the_calls_too(gw: ScriptedGateway) -> None:
    reply = ask(gw, "Checking. " + CALL_TEXT, "stop", 24)
    doc = gw.http.get(f"/jobs/{gw.row().id}", headers={"Authorization": f"Bearer {gw.key}"}).json()["response"]
    assert doc["finish_reason"] == "tool_calls" and doc["text"] == "Checking. " + CALL_TEXT
    assert doc["tool_calls"] == reply["choices"][0]["message"]["tool_calls"]
    assert doc["choices"][0]["content"] == "Checking." == reply["choices"][0]["message"]["content"]
    assert json.loads(doc["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
