"""Formatting, counting, constraints and one job's generation, against the real
bundled SmolLM2 in process (the batch engine's own behaviour: test_batching)."""

import llama_cpp
import pytest
from llama_cpp import Llama

from llama_tasks import engine, generation, registry
from llama_tasks.batching import BatchEngine
from llama_tasks.errors import BadGrammar, ContextOverflow
from llama_tasks.job import Job

DIGIT_GRAMMAR = 'root ::= [1-5]'
N_CTX = 512


@pytest.fixture(scope="module")
def spec():
    return registry.builtin_models()["smollm2"]


@pytest.fixture(scope="module")
def llm(spec):
    """The vocabulary alone, as the worker and the herder load it."""
    return engine.load_vocab(spec)


@pytest.fixture(scope="module")
def batch(spec):
    started = BatchEngine.load(spec.path, slots=2, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    yield started
    started.stop()


def job(**fields):
    values = dict(job_id="j", attempt=1, model="smollm2", max_tokens=16, expires_at=0.0, issued_at=0.0,
                  prompt="Once upon a time", temperature=0.0)
    values.update(fields)
    return Job(**values)


def run(batch, llm, j):
    pieces: list[str] = []
    result = generation.run(batch, generation.sequences(llm, j, lambda _index, piece, _logprobs: pieces.append(piece)))
    return result.first, pieces


def test_max_tokens_is_honoured_exactly(batch, llm):
    result, pieces = run(batch, llm, job(max_tokens=7))
    assert result.completion_tokens == 7
    assert result.finish_reason == "length"
    assert "".join(pieces) == result.text


def test_generation_matches_llama_cpp_own_completion(batch, llm, spec):
    j = job(max_tokens=24)
    result, _ = run(batch, llm, j)
    # llama-cpp-python's single-sequence path, with the engine's attention kernel.
    single = Llama(model_path=spec.path, n_ctx=N_CTX, n_threads=2, flash_attn=True, verbose=False)
    reference = single.create_completion(engine.prompt_tokens(llm, j), max_tokens=24, temperature=0.0)
    assert result.text == reference["choices"][0]["text"]
    assert result.completion_tokens == reference["usage"]["completion_tokens"]
    assert result.prompt_tokens == reference["usage"]["prompt_tokens"]


def test_stop_string_cuts_the_text_and_is_not_streamed(batch, llm):
    j = job(prompt="Count: 1, 2, 3,", max_tokens=60)
    free, _ = run(batch, llm, j)
    assert " 7" in free.text  # the model does count on
    result, pieces = run(batch, llm, job(prompt="Count: 1, 2, 3,", max_tokens=60, stop=[" 7"]))
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(" 7")]
    assert "".join(pieces) == result.text
    assert result.completion_tokens < free.completion_tokens


def test_chat_uses_the_models_own_template_and_stops_at_end_of_turn(batch, llm):
    j = job(prompt=None, messages=[{"role": "user", "content": "Say hello."}], max_tokens=100)
    text, stops = engine.render(llm, j)
    assert text.endswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_end|>" in stops
    result, pieces = run(batch, llm, j)
    assert result.finish_reason == "stop" and 0 < result.completion_tokens < 100
    assert "<|im_end|>" not in result.text and "".join(pieces) == result.text


def test_raw_prompt_is_used_as_is(llm):
    text, stops = engine.render(llm, job(prompt="exactly this"))
    assert (text, stops) == ("exactly this", [])


def test_grammar_restricts_answer_to_one_digit(batch, llm):
    for prompt in ["I love this, it is wonderful! Rating 1-5:", "Terrible, awful. Rating 1-5:"]:
        result, _ = run(batch, llm, job(prompt=prompt, max_tokens=4, temperature=0.8, seed=1, grammar=DIGIT_GRAMMAR))
        assert result.text in {"1", "2", "3", "4", "5"}
        assert result.finish_reason == "stop"


def test_json_schema_constrains_output(batch, llm):
    import json

    schema = {"type": "object", "properties": {"mood": {"enum": ["positive", "negative"]}}, "required": ["mood"]}
    j = job(prompt="Mood of 'great day' as JSON:", max_tokens=40, json_schema=schema)
    result, _ = run(batch, llm, j)
    assert json.loads(result.text)["mood"] in {"positive", "negative"}


@pytest.mark.parametrize("bad", ["root ::= [1-5", "root ::= undefined_rule", "not a grammar"])
def test_grammar_that_does_not_parse_is_a_typed_error(llm, bad):
    with pytest.raises(BadGrammar):
        engine.compile_grammar(llm, bad)


def test_bad_json_schema_is_a_typed_error():
    with pytest.raises(BadGrammar):
        engine.grammar_text(job(json_schema={"type": "no-such-type"}))


def test_context_overflow_reports_both_numbers(batch, llm):
    with pytest.raises(ContextOverflow) as info:
        generation.run(batch, generation.sequences(llm, job(prompt="word " * 500, max_tokens=20), None))
    assert info.value.as_dict() == {"prompt_tokens": 501, "max_tokens": 20, "n_ctx": N_CTX}


def test_vocab_only_load_counts_the_same_tokens(llm, spec):
    full = Llama(model_path=spec.path, n_ctx=N_CTX, verbose=False)
    for j in [job(prompt="Hello there, llama!"), job(prompt=None, messages=[{"role": "user", "content": "Hi ✨"}])]:
        assert engine.prompt_tokens(llm, j) == engine.prompt_tokens(full, j)
    assert engine.count_completion(llm, "two words") == engine.count_completion(full, "two words")


def test_a_seed_belongs_to_its_job_alone(batch, llm):
    # Temperature 1.0 over 24 tokens: unseeded runs vary; a seeded run is fixed.
    hot = dict(prompt="Once upon a time", max_tokens=24, temperature=1.0)
    seeded, _ = run(batch, llm, job(seed=7, **hot))
    unseeded = [run(batch, llm, job(**hot))[0].text for _ in range(4)]
    again, _ = run(batch, llm, job(seed=7, **hot))
    assert again.text == seeded.text  # a seed still reproduces its text
    # A seed left behind by the earlier job would make every later run its copy.
    assert len(set(unseeded)) > 1, unseeded
    assert unseeded.count(seeded.text) < len(unseeded), unseeded


def test_an_unseeded_job_gets_a_fresh_seed_every_time(llm):
    seeds = [generation.sequences(llm, job(seed=seed, max_tokens=1), None)[0].seed for seed in (None, 123, None)]
    assert seeds[1] == 123
    assert seeds[0] != seeds[2] and 0 <= min(seeds) and max(seeds) < llama_cpp.LLAMA_DEFAULT_SEED


def test_a_grammar_that_does_not_parse_never_reaches_stderr(llm, capfd):
    # llama.cpp prints a failed grammar whole to file descriptor 2; it is requester text.
    with pytest.raises(BadGrammar):
        engine.compile_grammar(llm, 'root ::= "zebra-violet-canary" [1-5')
    err = capfd.readouterr().err
    assert "zebra-violet-canary" not in err
    assert "grammar withheld" in err  # the rest of llama.cpp's message still gets through
