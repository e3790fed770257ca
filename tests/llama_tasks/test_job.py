import math

import pytest

from llama_tasks.errors import (
    BadStop,
    EmptyPrompt,
    InvalidMaxTokens,
    InvalidRequest,
    SamplingOutOfRange,
)
from llama_tasks.job import Job, validate


def job(**fields):
    values = dict(job_id="j", attempt=1, model="m", max_tokens=8, expires_at=0.0, issued_at=0.0, prompt="hi")
    values.update(fields)
    return Job(**values)


def test_a_sound_job_passes():
    validate(job(), max_tokens_cap=8)
    validate(job(prompt=None, messages=[{"role": "user", "content": "hi"}]), 8)


@pytest.mark.parametrize(
    "fields",
    [dict(prompt=""), dict(prompt="   \n"), dict(prompt=None), dict(prompt=None, messages=[{"role": "user", "content": " "}])],
)
def test_empty_prompt(fields):
    with pytest.raises(EmptyPrompt):
        validate(job(**fields), 8)


@pytest.mark.parametrize("max_tokens", [0, -1, 9, True, 2.0])
def test_max_tokens_outside_one_to_cap(max_tokens):
    with pytest.raises(InvalidMaxTokens) as info:
        validate(job(max_tokens=max_tokens), 8)
    assert info.value.cap == 8 and info.value.max_tokens == max_tokens


@pytest.mark.parametrize(
    "name,value",
    [("temperature", -0.1), ("temperature", 2.5), ("temperature", math.nan), ("top_p", 1.5),
     ("top_k", -1), ("min_p", 2), ("repeat_penalty", 0.1), ("temperature", "hot"), ("seed", -3)],
)
def test_sampling_out_of_range_names_the_parameter(name, value):
    with pytest.raises(SamplingOutOfRange) as info:
        validate(job(**{name: value}), 8)
    assert info.value.name == name


@pytest.mark.parametrize("stop", [["a"] * 5, [""], ["x" * 65], "not-a-list"])
def test_bad_stop_strings(stop):
    with pytest.raises(BadStop):
        validate(job(stop=stop), 8)


def test_prompt_and_messages_together_or_grammar_and_schema_together_are_refused():
    with pytest.raises(InvalidRequest):
        validate(job(messages=[{"role": "user", "content": "x"}]), 8)
    with pytest.raises(InvalidRequest):
        validate(job(grammar="root ::= \"a\"", json_schema={"type": "string"}), 8)


def test_payload_round_trip_and_unknown_fields():
    j = job(stop=["\n"], seed=7)
    assert Job.from_payload(j.to_payload()) == j
    with pytest.raises(InvalidRequest, match="unknown fields"):
        Job.from_payload(j.to_payload() | {"evil": 1})
    with pytest.raises(InvalidRequest):
        Job.from_payload({"job_id": "x"})


def test_errors_keep_their_fields_through_args():
    exc = InvalidMaxTokens(0, 8)
    rebuilt = type(exc)(*exc.args)
    assert rebuilt.as_dict() == {"max_tokens": 0, "cap": 8}
    assert str(rebuilt) == "max_tokens must be between 1 and 8, got 0"


@pytest.mark.parametrize("model", ["", ["smollm2"], None])
def test_model_must_be_a_name(model):
    with pytest.raises(InvalidRequest, match="model must be a model name"):
        validate(job(model=model), 8)
