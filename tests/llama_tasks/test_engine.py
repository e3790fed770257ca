"""The generation functions against the real bundled SmolLM2, in process."""

import pytest

from llama_tasks import engine, registry
from llama_tasks.errors import BadGrammar, ContextOverflow
from llama_tasks.job import Job
from llama_tasks.placement import place

DIGIT_GRAMMAR = 'root ::= [1-5]'


@pytest.fixture(scope="module")
def llm():
    return engine.load(registry.builtin_models()["smollm2"], place(0, [], 1, 2), n_ctx=512)


def job(**fields):
    values = dict(job_id="j", attempt=1, model="smollm2", max_tokens=16, expires_at=0.0, issued_at=0.0,
                  prompt="Once upon a time", temperature=0.0)
    values.update(fields)
    return Job(**values)


def run(llm, j, grammar=None):
    pieces: list[str] = []
    tokens = engine.prompt_tokens(llm, j)
    _, template_stops = engine.render(llm, j)
    g = engine.compile_grammar(llm, grammar) if grammar else None
    result = engine.generate(llm, j, tokens, j.stop + template_stops, g, pieces.append)
    return result, pieces


def test_max_tokens_is_honoured_exactly(llm):
    result, pieces = run(llm, job(max_tokens=7))
    assert result.completion_tokens == 7
    assert result.finish_reason == "length"
    assert "".join(pieces) == result.text


def test_generation_matches_llama_cpp_own_completion(llm):
    j = job(max_tokens=24)
    result, _ = run(llm, j)
    reference = llm.create_completion(engine.prompt_tokens(llm, j), max_tokens=24, temperature=0.0)
    assert result.text == reference["choices"][0]["text"]
    assert result.completion_tokens == reference["usage"]["completion_tokens"]
    assert result.prompt_tokens == reference["usage"]["prompt_tokens"]


def test_stop_string_cuts_the_text_and_is_not_streamed(llm):
    j = job(prompt="Count: 1, 2, 3,", max_tokens=60)
    free, _ = run(llm, j)
    assert " 7" in free.text  # the model does count on
    result, pieces = run(llm, job(prompt="Count: 1, 2, 3,", max_tokens=60, stop=[" 7"]))
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(" 7")]
    assert "".join(pieces) == result.text
    assert result.completion_tokens < free.completion_tokens


def test_chat_uses_the_models_own_template_and_stops_at_end_of_turn(llm):
    j = job(prompt=None, messages=[{"role": "user", "content": "Say hello."}], max_tokens=100)
    text, stops = engine.render(llm, j)
    assert text.endswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_end|>" in stops
    result, pieces = run(llm, j)
    assert result.finish_reason == "stop" and 0 < result.completion_tokens < 100
    assert "<|im_end|>" not in result.text and "".join(pieces) == result.text


def test_raw_prompt_is_used_as_is(llm):
    text, stops = engine.render(llm, job(prompt="exactly this"))
    assert (text, stops) == ("exactly this", [])


def test_grammar_restricts_answer_to_one_digit(llm):
    for prompt in ["I love this, it is wonderful! Rating 1-5:", "Terrible, awful. Rating 1-5:"]:
        result, _ = run(llm, job(prompt=prompt, max_tokens=4, temperature=0.8, seed=1), DIGIT_GRAMMAR)
        assert result.text in {"1", "2", "3", "4", "5"}
        assert result.finish_reason == "stop"


def test_json_schema_constrains_output(llm):
    import json

    schema = {"type": "object", "properties": {"mood": {"enum": ["positive", "negative"]}}, "required": ["mood"]}
    j = job(prompt="Mood of 'great day' as JSON:", max_tokens=40, json_schema=schema)
    result, _ = run(llm, j, engine.grammar_text(j))
    assert json.loads(result.text)["mood"] in {"positive", "negative"}


@pytest.mark.parametrize("bad", ["root ::= [1-5", "root ::= undefined_rule", "not a grammar"])
def test_grammar_that_does_not_parse_is_a_typed_error(llm, bad):
    with pytest.raises(BadGrammar):
        engine.compile_grammar(llm, bad)


def test_bad_json_schema_is_a_typed_error():
    with pytest.raises(BadGrammar):
        engine.grammar_text(job(json_schema={"type": "no-such-type"}))


def test_context_overflow_reports_both_numbers(llm):
    with pytest.raises(ContextOverflow) as info:
        engine.check_fits(500, 20, llm.n_ctx())
    assert info.value.as_dict() == {"prompt_tokens": 500, "max_tokens": 20, "n_ctx": 512}


def test_vocab_only_load_counts_the_same_tokens(llm):
    vocab = engine.load_vocab(registry.builtin_models()["smollm2"])
    for j in [job(prompt="Hello there, llama!"), job(prompt=None, messages=[{"role": "user", "content": "Hi ✨"}])]:
        assert engine.prompt_tokens(vocab, j) == engine.prompt_tokens(llm, j)
    assert engine.count_completion(vocab, "two words") == engine.count_completion(llm, "two words")


def test_a_seed_belongs_to_its_job_alone(llm):
    # Temperature 1.0 over 24 tokens: unseeded runs vary; a seeded run is fixed.
    hot = dict(prompt="Once upon a time", max_tokens=24, temperature=1.0)
    seeded, _ = run(llm, job(seed=7, **hot))
    unseeded = [run(llm, job(**hot))[0].text for _ in range(4)]
    again, _ = run(llm, job(seed=7, **hot))
    assert again.text == seeded.text  # a seed still reproduces its text
    # A seed left behind by the earlier job would make every later run its copy.
    assert len(set(unseeded)) > 1, unseeded
    assert unseeded.count(seeded.text) < len(unseeded), unseeded


def test_an_unseeded_job_gets_a_fresh_seed_every_time(llm, monkeypatch):
    seeds: list[int] = []
    monkeypatch.setattr(llm, "set_seed", seeds.append)
    for seed in (None, 123, None):
        run(llm, job(seed=seed, max_tokens=1))
    assert seeds[1] == 123
    assert seeds[0] != seeds[2] and 0 <= min(seeds) and max(seeds) < 0xFFFFFFFF


def test_a_grammar_that_does_not_parse_never_reaches_stderr(llm, capfd):
    # llama.cpp prints a failed grammar whole to file descriptor 2; it is requester text.
    with pytest.raises(BadGrammar):
        engine.compile_grammar(llm, 'root ::= "zebra-violet-canary" [1-5')
    err = capfd.readouterr().err
    assert "zebra-violet-canary" not in err
    assert "grammar withheld" in err  # the rest of llama.cpp's message still gets through
