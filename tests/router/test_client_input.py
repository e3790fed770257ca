"""The Python client refuses a request that cannot be right before it sends anything."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llama_tasks.errors import BadStop, InvalidRequest, SamplingOutOfRange
from router import Herder
from router.errors import BadDeadline, BadReference, InvalidOffer


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
