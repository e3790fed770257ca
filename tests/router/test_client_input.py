"""The Python client refuses a request that cannot be right before it sends anything."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llama_tasks.errors import BadLogprobs, BadStop, InvalidRequest, SamplingOutOfRange
from router import Herder
from router.core.errors import BadDeadline, BadReference, InvalidOffer


@pytest.fixture
def herder(monkeypatch: pytest.MonkeyPatch) -> tuple[Herder, list[tuple[str, Any]]]:
    client = Herder("llm_test-key")
    sent: list[tuple[str, Any]] = []

    def call(task: str, *args: Any, secret: bool = False, **kwargs: Any) -> Any:
        sent.append((task, args))
        return {"job_id": "j", "state": "queued"}

    monkeypatch.setattr(client, "_call", call)
    return client, sent


@pytest.mark.parametrize("kwargs,error", [
    (dict(prompt="a\ud800"), InvalidRequest),
    (dict(messages=[{"role": "user", "content": "\udfff"}]), InvalidRequest),
    (dict(prompt="hi", reference="r\ud800"), InvalidRequest),
    (dict(prompt="hi", top_k=40.5), SamplingOutOfRange),
    (dict(prompt="hi", temperature=math.nan), SamplingOutOfRange),
    (dict(prompt="hi", deadline_s=math.inf), BadDeadline),
    (dict(prompt="hi", multiplier=True), InvalidOffer),
    (dict(prompt="hi", reference=""), BadReference),
    (dict(prompt="hi", stop=["a"] * 9), BadStop),
    (dict(messages=[{"role": "hacker", "content": "hi"}]), InvalidRequest),
    (dict(prompt="hi", not_a_parameter=1), InvalidRequest),
    (dict(prompt="hi", n=0), SamplingOutOfRange),
    (dict(prompt="hi", n=9), SamplingOutOfRange),
    (dict(prompt="hi", n=True), SamplingOutOfRange),
    (dict(prompt="hi", logprobs=1), BadLogprobs),
    (dict(prompt="hi", top_logprobs=3), BadLogprobs),
    (dict(prompt="hi", logprobs=True, top_logprobs=21), SamplingOutOfRange),
])
def test_bad_requests_raise_typed_errors_and_send_nothing(herder: Any, kwargs: dict, error: type) -> None:
    client, sent = herder
    with pytest.raises(error):
        client.run(**kwargs)
    assert sent == []


def test_one_stop_string_is_sent_as_one_stop_string(herder: Any) -> None:
    client, sent = herder
    client.run("hi", stop="abc")
    (task, (key, request)), = sent
    assert task == "router.submit" and request["stop"] == ["abc"]


def test_quote_checks_too(herder: Any) -> None:
    client, sent = herder
    with pytest.raises(InvalidRequest):
        client.quote("x\ud800")
    assert sent == []


@pytest.mark.parametrize("kwargs,error", [
    (dict(prompt="hi", temperature=10**400), SamplingOutOfRange),
    (dict(prompt="hi", deadline_s=10**400), BadDeadline),
    (dict(prompt="hi", json_schema={"\ud800": None}), InvalidRequest),
])
def test_values_that_used_to_escape_as_bare_python_errors(herder: Any, kwargs: dict, error: type) -> None:
    client, sent = herder
    with pytest.raises(error):
        client.run(**kwargs)
    assert sent == []


def test_choices_and_logprobs_are_sent_as_asked(herder: Any) -> None:
    client, sent = herder
    client.run("hi", n=3, logprobs=True, top_logprobs=2)
    client.run("hi")
    (_, (_, asked)), (_, (_, plain)) = sent
    assert (asked["n"], asked["logprobs"], asked["top_logprobs"]) == (3, True, 2)
    assert (plain["n"], plain["logprobs"], plain["top_logprobs"]) == (1, False, 0)


def test_a_quote_for_several_completions_says_so(herder: Any) -> None:
    client, sent = herder
    client.quote("hi", 16, n=4)
    (task, (request,)), = sent
    assert task == "router.quote" and (request["n"], request["max_tokens"]) == (4, 16)
