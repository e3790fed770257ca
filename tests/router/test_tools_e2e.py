"""Tool calls end to end: the official ``openai`` client, the Python client and an agent framework
against a running stack with the bundled SmolLM2, each call schema-valid and each request charged exactly."""

from __future__ import annotations

import json
import re
from typing import Any

import agents
import httpx
import openai
import pytest
from jsonschema import validate

from llama_tasks import engine, registry
from router.core import ledger, views
from router.core.models import JobRow
from router.core.request import as_job
from tests.processes import ROOT
from tests.router.test_cli import llamas

pytestmark = pytest.mark.slow

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def gateway(stack: Any) -> str:
    return str(stack.gateway_url())


@pytest.fixture(scope="module")
def vocab() -> Any:
    return engine.load_vocab(registry.builtin_models()["smollm2"])


def client(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0)


def charged_exactly(stack: Any, vocab: Any, reply_id: str, usage: Any) -> int:
    """The job was quoted on exactly the prompt its worker fed, and charged what its usage says."""
    row = stack.job(reply_id.removeprefix("chatcmpl-"))
    job = as_job(row.id, 1, json.loads(row.request), 0.0, 0.0)
    assert usage.prompt_tokens == row.prompt_tokens == len(engine.prompt_tokens(vocab, job))
    assert usage.completion_tokens == row.completion_tokens
    assert usage.model_extra["charged"] == row.charged
    return int(row.charged)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_is_schema_valid_and_charged_exactly(stack: Any, gateway: str, vocab: Any, choice: Any) -> None:
    key, _ = stack.account(100_000)
    reply = client(gateway, key).chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
        max_tokens=60, temperature=0)
    [made] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert made.id.startswith("call_") and made.type == "function"
    if made.function.name == "get_weather" or choice != "required":
        assert made.function.name == "get_weather"
        validate(json.loads(made.function.arguments), CITY)
    charged = charged_exactly(stack, vocab, reply.id, reply.usage)
    assert stack.balance(key) == 100_000 - charged and stack.books() == []


def test_a_streamed_call_reassembles_to_the_whole_answer(stack: Any, gateway: str, vocab: Any) -> None:
    key, _ = stack.account(100_000)
    oa = client(gateway, key)
    asked: dict[str, Any] = dict(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, max_tokens=60, temperature=0)
    chunks = list(oa.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    calls: dict[int, dict[str, Any]] = {}
    content = ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "type": None,
                                                      "function": {"name": None, "arguments": ""}})
                if delta.id:  # the id, type and name come first, once
                    assert call["id"] is None and not call["function"]["arguments"]
                    call["id"], call["type"], call["function"]["name"] = delta.id, delta.type, delta.function.name
                call["function"]["arguments"] += delta.function.arguments or ""
    pieces = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or [] if not d.id]
    assert len(pieces) > 1  # the arguments came in pieces
    finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finish == ["tool_calls"]
    streamed = [calls[i] for i in sorted(calls)]
    job_id = chunks[0].id.removeprefix("chatcmpl-")
    # Exactly the job's own answer, ids included …
    assert streamed == views.response(stack.job(job_id))["choices"][0]["tool_calls"]
    assert content == ""
    # … and the same call as the same request answered whole.
    whole = oa.chat.completions.create(**asked)
    assert [{"name": c.function.name, "arguments": c.function.arguments}
            for c in whole.choices[0].message.tool_calls] == [c["function"] for c in streamed]
    spent = charged_exactly(stack, vocab, chunks[0].id, chunks[-1].usage)
    spent += charged_exactly(stack, vocab, whole.id, whole.usage)
    assert stack.balance(key) == 100_000 - spent and stack.books() == []


def test_a_two_step_tool_loop_gets_a_final_answer(stack: Any, gateway: str, vocab: Any) -> None:
    key, _ = stack.account(100_000)
    oa = client(gateway, key)
    first = oa.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, parallel_tool_calls=False,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=60, temperature=0)
    [call] = first.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    validate(arguments, CITY)
    messages: list[Any] = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id,
                            "content": f"{arguments['city']}: sunny, 21 degrees {arguments['unit']}"}]
    final = oa.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=40, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")
    # The second prompt holds the call and its result: quoted and charged as its worker fed it.
    spent = charged_exactly(stack, vocab, first.id, first.usage) + charged_exactly(stack, vocab, final.id, final.usage)
    assert final.usage.prompt_tokens > first.usage.prompt_tokens - 200
    assert stack.balance(key) == 100_000 - spent and stack.books() == []


def test_a_responses_function_call_round_trip(stack: Any, gateway: str) -> None:
    key, _ = stack.account(100_000)
    oa = client(gateway, key)
    weather = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": CITY}
    first = oa.responses.create(model="smollm2", input="What is the weather in Paris?", tools=[weather],
                                tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                temperature=0)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and first.status == "completed"
    validate(json.loads(call.arguments), CITY)
    final = oa.responses.create(model="smollm2", tools=[weather], tool_choice="none", max_output_tokens=40,
                                temperature=0, input=[
                                    {"role": "user", "content": "What is the weather in Paris?"},
                                    call.model_dump(exclude_none=True),
                                    {"type": "function_call_output", "call_id": call.call_id,
                                     "output": "sunny, 21 degrees"}])
    assert final.output_text and not [item for item in final.output if item.type == "function_call"]
    # Both turns are chat jobs of the same ledger: charged what their usage says, and nothing else.
    rows = [stack.job(reply.id.removeprefix("resp_")) for reply in (first, final)]
    assert [r.charged for r in rows] == [first.usage.model_extra["charged"], final.usage.model_extra["charged"]]
    # The second turn asked the chat path for the call and its output, as a tool loop does.
    asked = json.loads(rows[1].request)["messages"]
    assert asked[1]["tool_calls"][0]["id"] == call.call_id
    assert asked[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 degrees"}
    assert stack.balance(key) == 100_000 - sum(r.charged for r in rows) and stack.books() == []


def test_bad_tools_are_a_400_through_the_openai_client(stack: Any, gateway: str) -> None:
    key, _ = stack.account(10_000)
    with pytest.raises(openai.BadRequestError) as caught:
        client(gateway, key).chat.completions.create(
            model="smollm2", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert caught.value.body["param"] == "tool_choice"
    assert stack.balance(key) == 10_000


def test_the_python_client_carries_tools(stack: Any) -> None:
    key, herder = stack.account(100_000)
    # parallel_tool_calls left at its default: the model may call again, and ends after one call.
    doc = herder.run(messages=ASK, tokens=60, tools=TOOLS, tool_choice="required",
                     temperature=0.0).response(timeout=120)
    assert doc["status"] == "done" and doc["finish_reason"] == "tool_calls"
    [call] = doc["tool_calls"]
    assert call["function"]["name"] in ("get_weather", "get_time")
    assert stack.balance(key) == 100_000 - doc["charged"] and stack.books() == []


def test_an_agent_framework_drives_a_two_step_tool_loop(stack: Any, gateway: str) -> None:
    key, _ = stack.account(100_000)
    agents.set_tracing_disabled(True)  # nothing leaves the machine
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"{city}: sunny, 21 degrees"

    model = agents.OpenAIChatCompletionsModel(
        model="smollm2", openai_client=openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0))
    agent = agents.Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
                         model=model, model_settings=agents.ModelSettings(
                             tool_choice="required", temperature=0.0, max_tokens=60, parallel_tool_calls=False))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert seen and all(isinstance(city, str) and city for city in seen)  # called with schema-valid arguments
    assert isinstance(result.final_output, str) and result.final_output  # and it got a final answer
    with stack.sessions.begin() as s:
        account = ledger.account_by_key(s, key)
        rows = s.query(JobRow).filter(JobRow.account_id == account.id).all()
        states, spent = {r.state for r in rows}, sum(r.charged or 0 for r in rows)
    assert len(rows) >= 2 and states == {"done"}  # the call, then the answer after its result
    assert stack.balance(key) == 100_000 - spent and stack.books() == []


def test_llamas_run_offers_tools_from_a_file(stack: Any, tmp_path: Any) -> None:
    key, _ = stack.account(100_000)
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS))
    res = llamas(stack, "run", "What is the weather in Paris?", "--tokens", "60", "--tools", str(tools_file),
                 "--tool-choice", "get_weather", key=key)
    assert res.returncode == 0, res.stderr
    [line] = res.stdout.strip().splitlines()
    call = json.loads(line)
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    validate(json.loads(call["function"]["arguments"]), CITY)
    assert "finish=tool_calls" in res.stderr
    bad = llamas(stack, "run", "hi", "--tools", str(tools_file), "--tool-choice", "nope", key=key)
    assert bad.returncode == 1 and "tool_choice" in bad.stderr
    assert stack.books() == []


def test_the_readmes_tool_call_request_works_as_pasted(stack: Any, gateway: str) -> None:
    pasted = re.search(r"-d '(\{[^']*\"tools\"[^']*\})'", (ROOT / "README.md").read_text())
    assert pasted is not None, "the README shows a tool-call request"
    key, _ = stack.account(100_000)
    reply = httpx.post(gateway + "/v1/chat/completions", json=json.loads(pasted.group(1)),
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert reply.status_code == 200, reply.text
    [call] = reply.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and isinstance(json.loads(call["function"]["arguments"])["city"], str)
    assert reply.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert stack.balance(key) == 100_000 - reply.json()["usage"]["charged"]
