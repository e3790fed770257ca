"""Tools on a chat job: the checks, the prompt they render to, and the grammar built from their schemas.

The grammar is judged by llama.cpp itself (the sampler the engine uses,
against the bundled model's vocabulary): what it accepts is what a call
sampled under it can be.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import llama_cpp
import pytest
from jsonschema import validate

from llama_tasks import engine, generation, registry, tool_calls, tool_grammar, tool_prompt, tools
from llama_tasks.batching import BatchEngine
from llama_tasks.errors import BadTools, InvalidRequest
from llama_tasks.job import Job
from llama_tasks.job import validate as validate_job

ORDER = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "enum": ["tea", "coffee"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 3},
        "price": {"type": "number"},
        "extras": {"type": "array", "items": {"type": "string", "enum": ["milk", "sugar"]}, "maxItems": 2},
        "to": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "table": {"type": "integer"}}, "required": ["table"]},
        "note": {"type": "string", "maxLength": 20},
    },
    "required": ["item", "size", "to"],
}
TOOLS = [
    {"type": "function", "function": {"name": "order", "description": "Order a drink", "parameters": ORDER}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]


@pytest.fixture(scope="module")
def vocab() -> Any:
    return engine.load_vocab(registry.builtin_models()["smollm2"])


def accepts(vocab: Any, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets ``text`` be generated and then end."""
    grammar = engine.compile_grammar(vocab, gbnf)
    voc = vocab._model.vocab
    sampler = llama_cpp.llama_sampler_init_grammar(voc, grammar._grammar.encode(), grammar._root.encode())
    try:
        for token in [*vocab.tokenize(text.encode(), add_bos=False, special=False), vocab.token_eos()]:
            data = (llama_cpp.llama_token_data * 1)()
            data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
            array = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            if data[0].logit == float("-inf"):
                return False
            if token != vocab.token_eos():
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def order_call(**arguments: Any) -> str:
    return tool_prompt.call_text("order", arguments)


GOOD = {"item": "tea", "size": 2, "to": {"table": 4}}


@pytest.mark.parametrize("arguments,ok", [
    (GOOD, True),
    ({**GOOD, "price": -2.5e3, "extras": ["milk", "sugar"], "note": "hot"}, True),
    # The grammar writes required fields first (a subset of what the schema allows, never more).
    ({**GOOD, "to": {"table": 1, "name": "Ann"}}, True),
    ({"item": "tea", "size": 2}, False),  # a required field missing
    ({**GOOD, "item": "beer"}, False),  # outside the enum
    ({**GOOD, "size": 7}, False),  # above the maximum
    ({**GOOD, "size": 1.5}, False),  # not an integer
    ({**GOOD, "price": "free"}, False),  # not a number
    ({**GOOD, "extras": ["milk", "ice"]}, False),  # an array item outside its enum
    ({**GOOD, "to": {"name": "Ann"}}, False),  # a nested required field missing
    ({**GOOD, "colour": "red"}, False),  # a field the schema does not declare
])
def test_the_grammar_admits_exactly_the_calls_the_schema_allows(vocab: Any, arguments: dict, ok: bool) -> None:
    gbnf = tool_grammar.gbnf(tools.offered("required", TOOLS), parallel=False)
    assert accepts(vocab, gbnf, order_call(**arguments)) is ok
    if ok:
        validate(arguments, ORDER)


def test_the_grammar_names_only_offered_functions_and_honours_parallel(vocab: Any) -> None:
    every = tool_grammar.gbnf(tools.offered("required", TOOLS), parallel=True)
    two = order_call(**GOOD) + tools.SEPARATOR + tool_prompt.call_text("now", {})
    assert accepts(vocab, every, two)
    assert not accepts(vocab, every, tool_prompt.call_text("launch", {}))
    assert not accepts(vocab, every, "Sure! " + tool_prompt.call_text("now", {}))
    single = tool_grammar.gbnf(tools.offered("required", TOOLS), parallel=False)
    assert not accepts(vocab, single, two)
    named = tool_grammar.gbnf(tools.offered({"type": "function", "function": {"name": "now"}}, TOOLS), parallel=True)
    assert accepts(vocab, named, tool_prompt.call_text("now", {}))
    assert not accepts(vocab, named, order_call(**GOOD))


def test_functions_that_share_definition_names_keep_their_own(vocab: Any) -> None:
    def tool(name: str, kind: str) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}}, "required": ["x"],
            "$defs": {"Item": {"type": kind}}}}}
    gbnf = tool_grammar.gbnf(tools.offered("required", [tool("a", "integer"), tool("b", "boolean")]), parallel=False)
    assert accepts(vocab, gbnf, tool_prompt.call_text("a", {"x": 3}))
    assert accepts(vocab, gbnf, tool_prompt.call_text("b", {"x": True}))
    assert not accepts(vocab, gbnf, tool_prompt.call_text("b", {"x": 3}))


def chat_job(**fields: Any) -> Job:
    values: dict[str, Any] = dict(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=80,
                                  temperature=0.0, messages=[{"role": "user", "content": "A small tea for table 4."}],
                                  tools=TOOLS)
    values.update(fields)
    return Job(**values)


def fn(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [fn("a"), fn("a")]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "object",
                                                                              "properties": {"x": {"type": 5}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": []}, "tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"json_schema": {"type": "object"}}, "tools"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "42"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "now", "arguments": "not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tools_are_refused_naming_the_field(fields: dict, param: str) -> None:
    with pytest.raises(BadTools) as caught:
        validate_job(chat_job(**fields), None)
    assert caught.value.param == param


def test_tools_need_chat_messages() -> None:
    with pytest.raises(InvalidRequest):
        validate_job(chat_job(messages=None, prompt="hi"), None)


def test_a_schema_the_grammar_cannot_express_is_refused_as_bad_tools(vocab: Any) -> None:
    bad = [{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://example.com/schema.json"}}}}}]
    job = chat_job(tools=bad, tool_choice="required")
    validate_job(job, None)  # a valid JSON schema …
    with pytest.raises(BadTools):
        engine.grammar_text(job)  # … that the grammar cannot express: refused where it is built (at admission)


CONVERSATION = [
    {"role": "system", "content": "You run a cafe."},
    {"role": "user", "content": "A small tea for table 4."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "order", "arguments": json.dumps(GOOD)}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "order 17 placed"},
]


def test_the_plain_format_renders_tools_calls_and_results(vocab: Any) -> None:
    job = chat_job(messages=CONVERSATION, tool_choice="required")
    validate_job(job, None)
    text, _ = engine.render(vocab, job)
    assert "<tools>\n" + json.dumps({"name": "order", "description": "Order a drink", "parameters": ORDER})
    assert "You run a cafe.\n\n# Tools" in text and "You must call a function now." in text
    assert order_call(**GOOD) in text
    assert '<tool_response>{"name": "order", "content": "order 17 placed"}</tool_response>' in text
    assert text.index("<|im_start|>user\n<tool_response>") > text.index(order_call(**GOOD))
    # tool_choice none: the conversation is rendered, no tool is offered.
    quiet, _ = engine.render(vocab, chat_job(messages=CONVERSATION, tool_choice="none"))
    assert "<tools>" not in quiet and order_call(**GOOD) in quiet


def test_a_template_that_knows_tools_renders_them_itself() -> None:
    template = ("{% for t in tools %}[fn {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                "{% for c in m.tool_calls or [] %}({{ c.function.name }} {{ c.function.arguments.size }}){% endfor %}"
                "{% endfor %}")
    assert tool_prompt.handles_tools(template) and not tool_prompt.handles_tools("{{ messages }}")
    messages, offered = tool_prompt.template_messages(chat_job(messages=CONVERSATION))
    rendered = engine._chat_formatter(template, "", "")(messages=messages, tools=offered).prompt
    assert rendered.startswith("[fn order][fn now]<system>You run a cafe.")
    assert "(order 2)" in rendered and "<tool>order 17 placed" in rendered


def test_the_quote_counts_the_rendered_tools(vocab: Any) -> None:
    plain = len(engine.prompt_tokens(vocab, chat_job(tools=None)))
    offered = len(engine.prompt_tokens(vocab, chat_job()))
    assert offered > plain + 100  # the definitions are prompt tokens
    text, _ = engine.render(vocab, chat_job())
    assert offered == len(vocab.tokenize(text.encode(), add_bos=False, special=True))


def test_tool_text_is_never_a_public_prefix(vocab: Any) -> None:
    job = chat_job()
    tokens = engine.prompt_tokens(vocab, job)
    public = engine.public_tokens(vocab, job, tokens)
    assert "order" not in vocab.detokenize(tokens[:public]).decode()


@pytest.fixture(scope="module")
def batch() -> Any:
    spec = registry.builtin_models()["smollm2"]
    started = BatchEngine.load(spec.path, slots=2, n_ctx_per_slot=1024, n_threads=2, n_gpu_layers=0).start()
    yield started
    started.stop()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "order"}}])
def test_the_bundled_model_calls_with_schema_valid_arguments(vocab: Any, batch: Any, choice: Any) -> None:
    job = chat_job(tool_choice=choice, parallel_tool_calls=False, max_tokens=120)
    result = generation.run(batch, generation.sequences(vocab, job, None)).first
    parsed = tool_calls.parse(tool_calls.parser_for(job.generation(), "j"), result.text, result.finish_reason)
    assert parsed["finish_reason"] == "tool_calls", result
    [made] = parsed["tool_calls"]
    assert made["function"]["name"] in ("order", "now")
    if made["function"]["name"] == "order":
        validate(json.loads(made["function"]["arguments"]), ORDER)


def test_a_lazy_grammar_takes_over_once_its_trigger_is_written(vocab: Any, batch: Any) -> None:
    job = Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=40, temperature=0.0,
              messages=[{"role": "user", "content": "Write one sentence about the sea."}])
    free = generation.run(batch, generation.sequences(vocab, job, None)).first.text
    word = free.split()[1]  # a word the model writes anyway, after some free text
    spec = generation.sequences(vocab, job, None)[0]
    spec.grammar = engine.compile_grammar(vocab, f'root ::= "{word}" " zzz" " zzz"')
    spec.grammar_triggers = [word]
    lazy = generation.run(batch, [spec]).first
    assert lazy.text == free[:free.index(word)] + word + " zzz zzz" and lazy.finish_reason == "stop"


def test_tools_travel_in_the_signed_job_and_are_erased_with_the_text() -> None:
    from router.core.retention import erase_request

    job = chat_job(messages=CONVERSATION, tool_choice={"type": "function", "function": {"name": "order"}},
                   parallel_tool_calls=False)
    assert Job.from_payload(job.to_payload()) == job
    kept = json.loads(erase_request(json.dumps(job.generation())))
    assert not {"tools", "tool_choice", "messages"} & set(kept) and kept["parallel_tool_calls"] is False
