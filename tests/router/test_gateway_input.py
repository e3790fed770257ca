"""Bad input at the HTTP gateway: a 4xx in OpenAI's error shape, nothing held, no text in logs.

In process: the real gateway, herder core and SQLite ledger, with one ghost
worker heartbeat so admission dispatches into a recording sender.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from llama_cpp.llama_grammar import JSON_GBNF

from llama_tasks import registry, signing
from llama_tasks.constants import HERD_PREFIX
from router.core import ledger
from router.core.models import JobRow
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway.app import create_app
from router.herder import stub
from router.herder.herd import HerdReader

DEPOSIT = 100_000
SECRET = "zebra-violet-canary"


class Recorder(stub.StubTransport):
    """Keeps the generation fields of every job sent (what the worker will be asked)."""

    def __init__(self, sent: list[dict[str, Any]]) -> None:
        super().__init__()
        self.requests = sent

    def send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        super().send(row, envelope)
        self.requests.append(json.loads(row.request))


class Gateway:
    def __init__(self, svc: HerderService, key: str, sent: list[dict[str, Any]]) -> None:
        self.svc, self.key, self.sent = svc, key, sent
        self.http = TestClient(create_app(lambda: svc), raise_server_exceptions=False)

    def post(self, body: Any, path: str = "/v1/chat/completions", raw: bytes | None = None) -> Any:
        content = raw if raw is not None else json.dumps(body).encode()
        return self.http.post(path, content=content, headers={"Authorization": f"Bearer {self.key}",
                                                              "Content-Type": "application/json"})

    def untouched(self) -> bool:
        """Nothing was admitted: no job, the full balance, and the books balance."""
        with self.svc.sessions.begin() as s:
            account = ledger.account_by_key(s, self.key)
            return (s.query(JobRow).count() == 0 and ledger.balance(s, account) == DEPOSIT
                    and ledger.check(s) == [] and not self.sent)

    def last_job(self) -> dict[str, Any]:
        return self.sent[-1]

    def admit_only(self, body: dict[str, Any], real: bool = True, path: str = "/v1/chat/completions") -> Any:
        """Post ``body``; stop the request once admitted (no worker answers here); returns the Submission."""
        submit = self.svc.submit_counted

        def admitted(key: str, sub: Any) -> Any:
            if real:
                submit(key, sub)
            raise _Admitted(sub)

        self.svc.submit_counted = admitted  # type: ignore[method-assign]
        try:
            reply = self.http.post(path, json=body,
                                   headers={"Authorization": f"Bearer {self.key}"})
        finally:
            self.svc.submit_counted = submit  # type: ignore[method-assign]
        assert reply.status_code == 500 and reply.json()["error"]["code"] == "_Admitted", reply.text
        return self.admitted

    admitted: Any = None


class _Admitted(Exception):
    def __init__(self, sub: Any) -> None:
        super().__init__()
        self.sub = sub
        Gateway.admitted = sub


@pytest.fixture
def gw(r: Any, tmp_path: Path) -> Iterator[Gateway]:
    signing.generate_keypair(tmp_path)
    settings = HerderSettings(home=tmp_path, admin_key="operator-secret", account_max_in_flight=8)
    registry.add_model(settings.models_file, "ghost", Path(registry.smollm2_path()))
    sent: list[dict[str, Any]] = []
    svc = stub.build(settings, transport=Recorder(sent), herd=stub.StaticHerd(["ghost"], 64))
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "input", DEPOSIT)
    r.set(HERD_PREFIX + "ghost@input", json.dumps({"worker": "ghost@input", "model": "ghost", "slots": 64}), ex=60)
    try:
        yield Gateway(svc, key, sent)
    finally:
        r.delete(HERD_PREFIX + "ghost@input")


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "ghost", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def assert_openai_error(reply: Any, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and "code" in error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("field", ["temperature", "top_p", "deadline_s", "min_p"])
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_422_in_openai_shape(gw: Gateway, field: str, constant: str) -> None:
    raw = json.dumps(chat()).rstrip("}") + f', "{field}": {constant}}}'
    error = assert_openai_error(gw.post(None, raw=raw.encode()), 422)
    assert field in error["message"]
    assert gw.untouched()


@pytest.mark.parametrize("where", ["prompt", "message", "reference", "stop"])
def test_a_lone_surrogate_is_422_and_never_logged(gw: Gateway, where: str, caplog: Any) -> None:
    bad = SECRET + "\ud800"
    body: dict[str, Any] = {"model": "ghost", "max_tokens": 4}
    path = "/v1/chat/completions"
    if where == "prompt":
        body["prompt"], path = bad, "/v1/completions"
    else:
        body["messages"] = [{"role": "user", "content": bad if where == "message" else "hi"}]
        if where != "message":
            body[where] = bad
    caplog.set_level(logging.DEBUG)
    reply = gw.post(None, path=path, raw=json.dumps(body).encode())  # json.dumps writes "\ud800" escaped
    assert_openai_error(reply, 422)
    assert gw.untouched()
    assert SECRET not in caplog.text


@pytest.mark.parametrize("fields,code", [
    ({"grammar": "root ::= ( broken"}, "BadGrammar"),
    ({"grammar": 'root ::= undefined-rule'}, "BadGrammar"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "BadGrammar"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "BadGrammar"),
])
def test_bad_grammars_and_schemas_are_refused_at_admission(gw: Gateway, fields: dict, code: str) -> None:
    assert_openai_error(gw.post(chat(**fields)), 422, code)
    assert gw.untouched()


@pytest.mark.parametrize("fields,param", [
    ({"top_k": 40.5}, "top_k"),
    ({"temperature": True}, "temperature"),
    ({"seed": "7"}, "seed"),
    ({"top_p": "0.5"}, "top_p"),
])
def test_sampling_values_of_the_wrong_type_are_refused(gw: Gateway, fields: dict, param: str) -> None:
    assert_openai_error(gw.post(chat(**fields)), 422, "SamplingOutOfRange", param)
    assert gw.untouched()


@pytest.mark.parametrize("body", [
    chat(messages=[{"role": "hacker", "content": "hi"}]),
    chat(messages=[{"role": "", "content": "hi"}]),
    chat(messages=[]),
    chat(max_tokens=True),
    chat(max_tokens=4.0),
    chat(multiplier=True),
    chat(fee=True),
    chat(deadline_s=True),
    chat(stream="yes"),
    chat(response_format={"type": "xml"}),
    chat(max_tokens=4, max_completion_tokens=8),
])
def test_loose_input_is_refused(gw: Gateway, body: dict) -> None:
    assert_openai_error(gw.post(body), 422)
    assert gw.untouched()


def test_a_body_that_is_not_utf8_or_not_json_gets_openai_shape(gw: Gateway) -> None:
    assert_openai_error(gw.post(None, raw=b'{"prompt": "\xff\xfe"}'), 400, "MalformedBody")
    assert_openai_error(gw.post(None, raw=b'{"prompt": '), 400, "MalformedBody")
    assert_openai_error(gw.post(None, raw=b'["a list"]'), 400, "MalformedBody")
    assert gw.untouched()


@pytest.mark.parametrize("fields,param", [
    ({"best_of": 2}, "best_of"),
    ({"echo": True}, "echo"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"user": "someone"}, "user"),
    ({"made_up_option": 1}, "made_up_option"),
    ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    # Webhooks are named through the Python client only (docs/http-api.md#webhooks), public or private.
    ({"webhook": "https://example.com/hook"}, "webhook"),
    ({"webhook_url": "http://127.0.0.1/hook"}, "webhook_url"),
])
def test_parameters_we_do_not_honour_are_refused_by_name(gw: Gateway, fields: dict, param: str) -> None:
    error = assert_openai_error(gw.post(chat(**fields)), 400, "UnsupportedParameter", param)
    assert param in error["message"]
    assert gw.untouched()


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "ghost", "prompt": "hi", "max_tokens": 4, **fields}


@pytest.mark.parametrize("path,body,expected", [
    ("/v1/chat/completions", chat(n=3), {"n": 3, "logprobs": False, "top_logprobs": 0}),
    ("/v1/chat/completions", chat(logprobs=True), {"n": 1, "logprobs": True, "top_logprobs": 0}),
    ("/v1/chat/completions", chat(n=2, logprobs=True, top_logprobs=20), {"n": 2, "logprobs": True, "top_logprobs": 20}),
    ("/v1/chat/completions", chat(n=None, logprobs=None, top_logprobs=None), {"n": 1, "logprobs": False, "top_logprobs": 0}),
    ("/v1/completions", completion(n=8, logprobs=5), {"n": 8, "logprobs": True, "top_logprobs": 5}),
    ("/v1/completions", completion(logprobs=0), {"n": 1, "logprobs": True, "top_logprobs": 0}),
    ("/v1/completions", completion(logprobs=False, top_logprobs=0), {"n": 1, "logprobs": False, "top_logprobs": 0}),
    ("/v1/completions", completion(logprobs=None), {"n": 1, "logprobs": False, "top_logprobs": 0}),
])
def test_n_and_logprobs_are_honoured(gw: Gateway, path: str, body: dict, expected: dict) -> None:
    sub = gw.admit_only(body, path=path)
    for name, value in expected.items():
        assert getattr(sub, name) == value
        assert gw.last_job()[name] == value


def test_the_hold_covers_every_completion(gw: Gateway) -> None:
    gw.admit_only(chat(n=3, max_tokens=10))
    with gw.svc.sessions.begin() as s:
        row = s.query(JobRow).one()
        settings = gw.svc.settings
        assert row.n == 3
        assert row.quote == row.offered == settings.base_fee + settings.fee_per_token * (row.prompt_tokens + 30)
        assert ledger.balance(s, ledger.account_by_key(s, gw.key)) == DEPOSIT - row.offered


@pytest.mark.parametrize("path,fields,param", [
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"n": 9}, "n"),
    ("/v1/chat/completions", {"n": True}, "n"),
    ("/v1/chat/completions", {"n": 2.0}, "n"),
    ("/v1/chat/completions", {"n": "2"}, "n"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # alternatives without logprobs
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),  # legacy logprobs is a count
    ("/v1/completions", {"logprobs": 2.0}, "logprobs"),
    ("/v1/completions", {"n": 0}, "n"),
])
def test_bad_n_and_logprobs_are_422_naming_them_with_nothing_held(
    gw: Gateway, path: str, fields: dict, param: str
) -> None:
    body = chat(**fields) if path == "/v1/chat/completions" else completion(**fields)
    assert_openai_error(gw.post(body, path=path), 422, param=param)
    assert gw.untouched()


@pytest.mark.parametrize("path,fields,expected", [
    ("/v1/chat/completions", {"n": 2}, {"n": 2}),
    ("/v1/chat/completions", {"logprobs": True}, {"logprobs": True}),
    ("/v1/chat/completions", {"n": 3, "logprobs": True, "top_logprobs": 3},
     {"n": 3, "logprobs": True, "top_logprobs": 3}),
    ("/v1/completions", {"n": 3}, {"n": 3}),
    ("/v1/completions", {"logprobs": 2}, {"logprobs": True, "top_logprobs": 2}),
])
def test_streaming_several_choices_or_logprobs_is_admitted_as_asked(
    gw: Gateway, path: str, fields: dict, expected: dict
) -> None:
    body = (chat if path == "/v1/chat/completions" else completion)(stream=True, **fields)
    gw.admit_only(body, path=path)
    job = gw.last_job()
    assert {name: job[name] for name in expected} == expected


@pytest.mark.parametrize("fields", [{"top_logprobs": 2}, {"logprobs": 2, "top_logprobs": 2}])
def test_text_completions_ask_for_alternatives_with_logprobs_not_top_logprobs(gw: Gateway, fields: dict) -> None:
    error = assert_openai_error(gw.post(completion(**fields), path="/v1/completions"), 400,
                                "UnsupportedParameter", "top_logprobs")
    assert "logprobs: N" in error["message"]
    assert gw.untouched()


def test_streaming_one_plain_choice_is_still_accepted(gw: Gateway) -> None:
    gw.admit_only(chat(stream=True, n=1, logprobs=False))
    assert len(gw.sent) == 1 and gw.last_job()["n"] == 1


def test_neutral_values_of_openai_parameters_are_accepted(gw: Gateway) -> None:
    gw.admit_only(chat(n=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0, tools=[],
                       stream_options=None))
    assert len(gw.sent) == 1


@pytest.mark.parametrize("body,expected", [
    (chat(max_tokens=None, max_completion_tokens=9), {"max_tokens": 9}),
    (chat(max_tokens=9, max_completion_tokens=9), {"max_tokens": 9}),
    (chat(max_tokens=None, max_completion_tokens=7), {"max_tokens": 7}),
    (chat(stop="abc"), {"stop": ["abc"]}),
    (chat(response_format={"type": "json_object"}), {"grammar": JSON_GBNF}),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}),
     {"json_schema": {"type": "integer"}}),
    (chat(messages=[{"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]),
     {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]}),
])
def test_honoured_openai_parameters_reach_the_job(gw: Gateway, body: dict, expected: dict) -> None:
    sub = gw.admit_only(body)
    for name, value in expected.items():
        assert getattr(sub, name) == value
        assert gw.last_job()[name] == value


def test_every_job_gets_its_own_seed_unless_it_asks_for_one(gw: Gateway) -> None:
    for _ in range(3):
        gw.admit_only(chat())
    gw.admit_only(chat(seed=7))
    seeds = [job["seed"] for job in gw.sent]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds[:3])) == 3 and seeds[3] == 7


def test_metrics_need_the_admin_key_when_one_is_set(gw: Gateway) -> None:
    assert_openai_error(gw.http.get("/metrics"), 401)
    assert_openai_error(gw.http.get("/metrics", headers={"Authorization": f"Bearer {gw.key}"}), 401)
    ok = gw.http.get("/metrics", headers={"Authorization": "Bearer operator-secret"})
    assert ok.status_code == 200 and "llamas_" in ok.text


def test_unknown_routes_answer_in_openai_shape(gw: Gateway) -> None:
    assert_openai_error(gw.http.get("/v1/nothing-here"), 404)


def test_redis_gone_after_start_up_is_a_503_in_openai_shape(tmp_path: Path) -> None:
    from tests.stack import free_port

    signing.generate_keypair(tmp_path)
    settings = HerderSettings(home=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    registry.add_model(settings.models_file, "ghost", Path(registry.smollm2_path()))
    # The herd is read from the (unreachable) Redis, as a real gateway reads it.
    svc = stub.build(settings, herd=HerdReader(redis.Redis.from_url(settings.redis_url)))
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "outage", DEPOSIT)
    http = TestClient(create_app(lambda: svc), raise_server_exceptions=False)
    reply = http.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(reply, 503, "ConnectionError")
    with svc.sessions.begin() as s:
        assert s.query(JobRow).count() == 0 and ledger.check(s) == []


def test_junk_values_are_quoted_back_safely(gw: Gateway) -> None:
    # The error echoes the bad value: a surrogate in a nested key must not break the JSON body.
    raw = json.dumps(chat()).rstrip("}") + ', "temperature": {"\\ud800": [NaN, {"a": Infinity}]}}'
    assert_openai_error(gw.post(None, raw=raw.encode()), 422, "SamplingOutOfRange", "temperature")
    assert gw.untouched()


def test_a_bug_is_a_500_in_openai_shape_and_its_message_stays_out_of_the_log(gw: Gateway, caplog: Any) -> None:
    def broken(key: str, sub: Any) -> Any:
        raise RuntimeError(f"something quoting the prompt: {SECRET}")

    gw.svc.submit_counted = broken  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG)
    reply = gw.post(chat())
    assert_openai_error(reply, 500, "RuntimeError")
    assert SECRET not in reply.text and SECRET not in caplog.text
    assert "RuntimeError" in caplog.text  # the operator still learns what broke, and where
