import math

import pytest

from llama_tasks.errors import (
    BadLogprobs,
    BadStop,
    EmptyPrompt,
    InvalidMaxTokens,
    InvalidRequest,
    SamplingOutOfRange,
)
from llama_tasks.job import MAX_CHOICES, MAX_TOP_LOGPROBS, Generation, Job, validate


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
     ("top_k", -1), ("min_p", 2), ("repeat_penalty", 0.1), ("temperature", "hot"), ("seed", -3),
     ("top_k", 40.5), ("top_k", 40.0), ("top_p", math.inf), ("temperature", True), ("seed", 2**31),
     ("seed", 1.5)],
)
def test_sampling_out_of_range_names_the_parameter(name, value):
    with pytest.raises(SamplingOutOfRange) as info:
        validate(job(**{name: value}), 8)
    assert info.value.name == name


@pytest.mark.parametrize("stop", [["a"] * 5, [""], ["x" * 65], 42, ["\ud800"]])
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


def test_one_stop_string_is_one_stop_string_not_its_characters():
    assert job(stop="abc").stop == ["abc"]
    assert job(stop=None).stop == []


@pytest.mark.parametrize("role", ["hacker", "", None, 3, "System"])
def test_message_roles_are_checked(role):
    with pytest.raises(InvalidRequest, match="role"):
        validate(job(prompt=None, messages=[{"role": role, "content": "hi"}]), 8)


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"role": "user", "content": "hi", "name": "x"}],
                                      [{"role": "user", "content": ["hi"]}], "hi"])
def test_messages_must_be_role_and_text(messages):
    with pytest.raises(InvalidRequest):
        validate(job(prompt=None, messages=messages), 8)


@pytest.mark.parametrize("fields", [dict(prompt="a\ud800b"), dict(prompt=None, messages=[{"role": "user", "content": "\udfff"}]),
                                    dict(grammar='root ::= "\ud800"'), dict(model="m\ud800")])
def test_lone_surrogates_are_refused_as_invalid_requests(fields):
    with pytest.raises(InvalidRequest):
        validate(job(**fields), 8)


def test_json_schema_must_be_plain_json():
    with pytest.raises(InvalidRequest, match="json_schema"):
        validate(job(json_schema={"maximum": math.nan}), 8)
    with pytest.raises(InvalidRequest, match="json_schema"):
        validate(job(json_schema=["not", "an", "object"]), 8)


def test_a_client_without_the_cap_checks_everything_else():
    validate(job(max_tokens=10**6), None)
    with pytest.raises(InvalidMaxTokens):
        validate(job(max_tokens=0), None)


@pytest.mark.parametrize("name", ["temperature", "top_k", "repeat_penalty", "min_p"])
def test_huge_integers_are_out_of_range_not_an_overflow(name):
    with pytest.raises(SamplingOutOfRange):
        validate(job(**{name: 10**400}), 8)


@pytest.mark.parametrize("schema", [{"\ud800": None}, {"type": "string", "enum": ["\ud800"]}])
def test_a_lone_surrogate_inside_a_json_schema_is_refused(schema):
    with pytest.raises(InvalidRequest, match="json_schema"):
        validate(job(json_schema=schema), 8)


# --- n, logprobs, top_logprobs ---------------------------------------------------


def test_choices_and_logprobs_default_to_one_plain_completion():
    j = job()
    assert (j.n, j.logprobs, j.top_logprobs) == (1, False, 0)
    assert {"n": 1, "logprobs": False, "top_logprobs": 0}.items() <= Generation().generation().items()


@pytest.mark.parametrize("fields", [
    dict(n=MAX_CHOICES), dict(n=1, logprobs=True), dict(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS),
    dict(n=3, logprobs=True, top_logprobs=0),
])
def test_choices_and_logprobs_within_their_ranges_pass(fields):
    validate(job(**fields), 8)


@pytest.mark.parametrize("name,value,low,high", [
    ("n", 0, 1, MAX_CHOICES), ("n", MAX_CHOICES + 1, 1, MAX_CHOICES), ("n", -1, 1, MAX_CHOICES),
    ("n", True, 1, MAX_CHOICES), ("n", 2.0, 1, MAX_CHOICES), ("n", "2", 1, MAX_CHOICES), ("n", None, 1, MAX_CHOICES),
    ("top_logprobs", MAX_TOP_LOGPROBS + 1, 0, MAX_TOP_LOGPROBS), ("top_logprobs", -1, 0, MAX_TOP_LOGPROBS),
    ("top_logprobs", True, 0, MAX_TOP_LOGPROBS), ("top_logprobs", 2.0, 0, MAX_TOP_LOGPROBS),
])
def test_n_and_top_logprobs_out_of_range_name_the_parameter(name, value, low, high):
    with pytest.raises(SamplingOutOfRange) as info:
        validate(job(logprobs=True, **{name: value}), 8)
    assert info.value.as_dict() == {"name": name, "value": value, "low": low, "high": high}


@pytest.mark.parametrize("value", [1, 0, "true", None, [True]])
def test_logprobs_must_be_a_boolean(value):
    with pytest.raises(BadLogprobs) as info:
        validate(job(logprobs=value), 8)
    assert info.value.param == "logprobs"


def test_alternatives_without_logprobs_are_refused():
    with pytest.raises(BadLogprobs) as info:
        validate(job(top_logprobs=2), 8)
    assert info.value.as_dict() == {"param": "top_logprobs",
                                    "detail": "alternatives are returned only with logprobs true"}


def test_choices_and_logprobs_travel_in_the_payload():
    j = job(n=4, logprobs=True, top_logprobs=5)
    assert Job.from_payload(j.to_payload()) == j
    old = {k: v for k, v in j.to_payload().items() if k not in ("n", "logprobs", "top_logprobs")}
    legacy = Job.from_payload(old)  # signed by a herder that predates these fields
    assert (legacy.n, legacy.logprobs, legacy.top_logprobs) == (1, False, 0)
