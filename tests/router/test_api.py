"""The HTTP gateway: the official ``openai`` client against a running stack,
and raw HTTP for the error cases."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from router.core import views
from router.core.models import JobRow
from tests.processes import wait_for

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway_url()


def client(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0)


def test_chat_completion_with_the_openai_client(stack, gateway):
    key, _ = stack.account(10_000)
    reply = client(gateway, key).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=24,
        extra_body={"multiplier": 2},
    )
    text = reply.choices[0].message.content
    usage = reply.usage.model_dump()
    row = stack.job(reply.id.removeprefix("chatcmpl-"))
    assert text and text == views.response(row)["text"]
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert usage["completion_tokens"] == row.completion_tokens and usage["prompt_tokens"] == row.prompt_tokens
    assert usage["charged"] + usage["refunded"] == usage["offered"] == 2 * row.quote
    assert stack.balance(key) == 10_000 - usage["charged"]


def test_chat_streaming_with_the_openai_client(stack, gateway):
    key, _ = stack.account(10_000)
    chunks = list(client(gateway, key).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me about llamas."}], max_tokens=40,
        stream=True, stream_options={"include_usage": True},
    ))
    # A chunk marked llamas_restart voids the text before it (a worker was lost and the retry differs).
    after = [i for i, c in enumerate(chunks) if (c.model_extra or {}).get("llamas_restart")]
    kept = chunks[after[-1] + 1:] if after else chunks
    text = "".join(c.choices[0].delta.content or "" for c in kept if c.choices)
    job_id = chunks[0].id.removeprefix("chatcmpl-")
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # it did stream
    assert text == views.response(stack.job(job_id))["text"]
    assert chunks[-1].usage.completion_tokens == stack.job(job_id).completion_tokens


def test_text_completions_plain_and_streaming(stack, gateway):
    key, _ = stack.account(10_000)
    oa = client(gateway, key)
    plain = oa.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 10
    pieces = list(oa.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10,
                                        temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_n_choices_logprobs_and_cached_tokens_through_the_openai_client(stack, gateway):
    key, _ = stack.account(100_000)
    oa = client(gateway, key)
    system = {"role": "system", "content": "You answer in one short sentence about animals. " * 8}
    first = oa.chat.completions.create(
        model="smollm2", messages=[system, {"role": "user", "content": "Name a colour."}], max_tokens=6,
        n=3, temperature=1.0, seed=5, logprobs=True, top_logprobs=2,
    )
    row = stack.job(first.id.removeprefix("chatcmpl-"))
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.completion_tokens == row.completion_tokens
    # Charged for all three completions, never more than the quote of n × max_tokens.
    assert row.quote == 1 + row.prompt_tokens + 3 * 6 and row.charged == 1 + row.prompt_tokens + row.completion_tokens
    for choice in first.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    # The same system prompt again: the worker's prompt cache serves it.
    second = oa.chat.completions.create(
        model="smollm2", messages=[system, {"role": "user", "content": "Name a bird."}], max_tokens=4,
    )
    assert second.usage.prompt_tokens_details.cached_tokens > 60
    assert stack.job(second.id.removeprefix("chatcmpl-")).cached_tokens == second.usage.prompt_tokens_details.cached_tokens
    legacy = oa.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=5, temperature=0,
                                   logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.top_logprobs) == 5
    assert stack.books() == []


def streamed_choices(chunks: list) -> dict[int, dict]:
    """What a reader keeps of each streamed choice: text, logprob entries and finish reasons.

    A chunk marked ``llamas_restart`` voids what its choice showed before it
    (a worker was lost and the retry differs).
    """
    kept: dict[int, dict] = {}
    for chunk in chunks:
        restart = (chunk.model_extra or {}).get("llamas_restart")
        if restart:
            kept[restart["index"]] = {"text": "", "logprobs": [], "finish": []}
        for c in chunk.choices:
            mine = kept.setdefault(c.index, {"text": "", "logprobs": [], "finish": []})
            mine["text"] += c.delta.content or ""
            if c.logprobs is not None:
                mine["logprobs"] += [t.model_dump() for t in c.logprobs.content]
            if c.finish_reason:
                mine["finish"].append(c.finish_reason)
    return kept


def test_three_choices_stream_together_through_the_openai_client(stack, gateway):
    key, _ = stack.account(100_000)
    chunks = list(client(gateway, key).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me about llamas."}], max_tokens=16, n=3,
        temperature=1.0, seed=7, stream=True, stream_options={"include_usage": True},
    ))
    row = stack.job(chunks[0].id.removeprefix("chatcmpl-"))
    stored = views.response(row)["choices"]
    kept = streamed_choices(chunks)
    assert sorted(kept) == [0, 1, 2]
    for choice in stored:
        assert kept[choice["index"]]["text"] == choice["text"]
        assert kept[choice["index"]]["finish"] == [choice["finish_reason"]]
    assert len({c["text"] for c in stored}) > 1  # three samples, not one thrice
    assert chunks[-1].usage.completion_tokens == row.completion_tokens
    assert chunks[-1].usage.model_extra["charged"] == row.charged
    assert stack.balance(key) == 100_000 - row.charged and stack.books() == []


def test_logprobs_stream_as_the_plain_answer_gives_them(stack, gateway):
    key, _ = stack.account(100_000)
    oa = client(gateway, key)
    ask = dict(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, n=2,
               temperature=1.0, seed=21, logprobs=True, top_logprobs=2)
    plain = oa.chat.completions.create(**ask)
    chunks = list(oa.chat.completions.create(**ask, stream=True))
    row = stack.job(chunks[0].id.removeprefix("chatcmpl-"))
    kept = streamed_choices(chunks)
    for choice in views.response(row)["choices"]:
        # Exactly what the job stored, token by token ...
        assert kept[choice["index"]]["text"] == choice["text"]
        assert kept[choice["index"]]["logprobs"] == choice["logprobs"]
        # ... and the same tokens as the plain answer for the same seed.
        same = plain.choices[choice["index"]]
        assert kept[choice["index"]]["text"] == same.message.content
        assert [t["token"] for t in kept[choice["index"]]["logprobs"]] == [t.token for t in same.logprobs.content]
        assert [t["logprob"] for t in kept[choice["index"]]["logprobs"]] == pytest.approx(
            [t.logprob for t in same.logprobs.content], abs=1e-3)
    assert all(len(t["top_logprobs"]) == 2 for k in kept.values() for t in k["logprobs"])
    assert stack.books() == []


def test_a_response_through_the_openai_client_is_charged_exactly(stack, gateway):
    key, _ = stack.account(10_000)
    reply = client(gateway, key).responses.create(model="smollm2", input="Say hello.",
                                                  instructions="You are terse.", max_output_tokens=16)
    row = stack.job(reply.id.removeprefix("resp_"))
    assert reply.status in ("completed", "incomplete") and reply.output_text == views.response(row)["text"]
    assert reply.output_text and reply.output[0].type == "message"
    usage = reply.usage.model_dump()
    assert usage["input_tokens"] == row.prompt_tokens and usage["output_tokens"] == row.completion_tokens
    assert usage["charged"] == row.charged and stack.balance(key) == 10_000 - row.charged
    assert stack.books() == []


def test_a_streamed_response_through_the_openai_client(stack, gateway):
    key, _ = stack.account(10_000)
    events = list(client(gateway, key).responses.create(model="smollm2", input="Tell me about llamas.",
                                                        max_output_tokens=32, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # A restart event voids the deltas before it (a worker was lost and the retry differs).
    restarts = [i for i, e in enumerate(events) if e.type == "response.llamas_restart"]
    deltas = [e.delta for e in events[(restarts[-1] + 1 if restarts else 0):] if e.type == "response.output_text.delta"]
    final = events[-1].response
    row = stack.job(final.id.removeprefix("resp_"))
    assert len(deltas) > 3 and "".join(deltas) == final.output_text == views.response(row)["text"]
    assert final.usage.output_tokens == row.completion_tokens
    assert final.usage.model_dump()["charged"] == row.charged and stack.balance(key) == 10_000 - row.charged


def test_a_json_schema_response_parses_against_its_schema(stack, gateway):
    key, _ = stack.account(10_000)
    schema = {"type": "object", "properties": {"animal": {"type": "string", "enum": ["llama", "alpaca"]},
                                               "legs": {"type": "integer"}},
              "required": ["animal", "legs"], "additionalProperties": False}
    reply = client(gateway, key).responses.create(
        model="smollm2", input="Describe a llama as JSON.", max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "animal", "schema": schema, "strict": True}})
    doc = json.loads(reply.output_text)
    assert doc["animal"] in ("llama", "alpaca") and isinstance(doc["legs"], int)
    row = stack.job(reply.id.removeprefix("resp_"))
    assert stack.balance(key) == 10_000 - row.charged and stack.books() == []


def test_a_bad_response_request_is_refused_with_nothing_held(stack, gateway):
    key, _ = stack.account(1_000)
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway, key).responses.create(model="smollm2", input="hi", previous_response_id="resp_x")
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway, key).responses.create(model="smollm2", input="hi", store=True)
    assert info.value.body["param"] == "store"
    assert stack.balance(key) == 1_000 and stack.books() == []


def test_models_info_health_and_jobs(stack, gateway):
    key, _ = stack.account(10_000)
    assert [m.id for m in client(gateway, key).models.list()] == ["smollm2"]
    health = httpx.get(gateway + "/health").json()
    assert health["status"] == "ok" and health["broker"]["state"] == health["ledger"]["state"] == "ok"
    assert health["herd"]["slots"] == 1
    info = httpx.get(gateway + "/info").json()
    assert info["base_fee"] == 1 and info["fee_per_token"] == 1 and info["models"][0]["name"] == "smollm2"
    assert [row["multiplier"] for row in info["price_discovery"]] == [1.0, 1.5, 2.0, 5.0]
    reply = client(gateway, key).completions.create(model="smollm2", prompt="Hi", max_tokens=3)
    job_id = reply.id.removeprefix("cmpl-")
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{gateway}/jobs/{job_id}", headers=auth).json()["state"] == "done"
    other, _ = stack.account(10)
    assert httpx.get(f"{gateway}/jobs/{job_id}", headers={"Authorization": f"Bearer {other}"}).status_code == 404


def post(gateway: str, key: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(gateway + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {key}", **headers}, timeout=60)


def test_error_statuses_are_openai_style(stack, gateway):
    key, _ = stack.account(1_000)
    poor, _ = stack.account(5)
    bad_key = post(gateway, "llm_not-a-key", {"prompt": "hi", "max_tokens": 4})
    assert bad_key.status_code == 401 and bad_key.json()["error"]["type"] == "invalid_api_key"
    no_key = httpx.post(gateway + "/v1/completions", json={"prompt": "hi"}, timeout=60)
    assert no_key.status_code == 401

    funds = post(gateway, poor, {"prompt": "hi", "max_tokens": 4})
    assert funds.status_code == 402 and funds.json()["error"]["code"] == "InsufficientFunds"
    fee = post(gateway, key, {"prompt": "hi", "max_tokens": 4}, **{"X-Llamas-Fee": "1"})
    assert fee.status_code == 402 and fee.headers["X-Needed"] == str(fee.json()["error"]["needed"])

    too_long = post(gateway, key, {"prompt": "word " * 1500, "max_tokens": 1000})
    err = too_long.json()["error"]
    assert too_long.status_code == 422 and err["code"] == "ContextOverflow"
    assert err["max_tokens"] == 1000 and err["n_ctx"] == 2048 and err["prompt_tokens"] > 1048
    assert post(gateway, key, {"prompt": "hi", "max_tokens": 0}).status_code == 422
    assert post(gateway, key, {"prompt": "", "max_tokens": 4}).status_code == 422
    assert post(gateway, key, {"max_tokens": 4}).status_code == 422  # no prompt at all
    assert post(gateway, key, {"prompt": "hi", "model": "nope"}).status_code == 404

    ref = f"ref-{uuid.uuid4().hex}"
    first = post(gateway, key, {"prompt": "hi", "max_tokens": 2, "reference": ref})
    again = post(gateway, key, {"prompt": "hi", "max_tokens": 2, "reference": ref})
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    conflict = post(gateway, key, {"prompt": "bye", "max_tokens": 2, "reference": ref})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "ReferenceConflict"
    assert stack.books() == []


def test_a_client_that_disconnects_from_a_queued_request_is_refunded(stack, gateway):
    key, herder = stack.account(100_000)
    blocker = stack.occupy(herder)
    ref = f"gone-{uuid.uuid4().hex}"
    with pytest.raises(httpx.ReadTimeout):
        post_timeout = httpx.Timeout(5.0, read=1.0)
        httpx.post(gateway + "/v1/completions", json={"prompt": "Wait for me", "max_tokens": 8, "reference": ref},
                   headers={"Authorization": f"Bearer {key}"}, timeout=post_timeout)
    def state() -> str | None:
        with stack.sessions.begin() as s:
            return s.query(JobRow.state).filter(JobRow.reference == ref).scalar()

    wait_for(lambda: state() == "cancelled", 20, "the disconnected request to be cancelled", lambda: str(state()))
    done = stack.release(blocker)
    assert stack.balance(key) == 100_000 - done["charged"]


def test_no_worker_for_a_model_is_503_and_holds_nothing(stack, gateway):
    from pathlib import Path

    from llama_tasks import registry

    models_file = Path(stack.env["LLAMAS_HOME"]) / "models.json"
    before = models_file.read_text() if models_file.exists() else None
    # Registered (so not "unknown"), but no worker serves it.
    registry.add_model(models_file, "unserved", Path(registry.smollm2_path()))
    try:
        key, _ = stack.account(1_000)
        r = post(gateway, key, {"prompt": "hi", "max_tokens": 4, "model": "unserved"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "NoWorkers"
        assert stack.balance(key) == 1_000
        unknown = post(gateway, key, {"prompt": "hi", "max_tokens": 4, "model": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "UnknownModelRequested"
    finally:
        if before is None:
            models_file.unlink()
        else:
            models_file.write_text(before)


def test_queue_full_is_429_and_holds_nothing(r, tmp_path):
    """In process, on its own ledger, with a one-job queue for a model no real worker takes."""
    import json as json_lib
    from pathlib import Path

    from fastapi.testclient import TestClient

    from llama_tasks import registry, signing
    from llama_tasks.constants import HERD_PREFIX
    from router.core import ledger
    from router.core.request import Submission
    from router.core.settings import HerderSettings
    from router.gateway.app import create_app
    from router.herder import stub

    signing.generate_keypair(tmp_path)
    settings = HerderSettings(home=tmp_path, max_queue=1)
    registry.add_model(settings.models_file, "ghost", Path(registry.smollm2_path()))
    transport = stub.StubTransport()
    svc = stub.build(settings, transport=transport, herd=stub.StaticHerd(["ghost"], 1))
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "q", 10_000)
    # One ghost worker with one slot: the first job takes it, the second waits.
    r.set(HERD_PREFIX + "ghost@test", json_lib.dumps({"worker": "ghost@test", "model": "ghost", "slots": 1}), ex=30)
    try:
        assert svc.submit(key, Submission(prompt="first", max_tokens=4, model="ghost"))["state"] == "running"
        assert svc.submit(key, Submission(prompt="second", max_tokens=4, model="ghost"))["state"] == "queued"
        http = TestClient(create_app(lambda: svc))
        full = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "model": "ghost"},
                         headers={"Authorization": f"Bearer {key}"})
        assert full.status_code == 429 and full.json()["error"]["code"] == "QueueFull"
        assert full.json()["error"]["limit"] == 1
        with svc.sessions.begin() as s:
            assert ledger.check(s) == []
            held = sum(row.offered for row in s.query(JobRow).filter(JobRow.state.in_(["queued", "running"])))
            assert ledger.balance(s, ledger.account_by_key(s, key)) == 10_000 - held
            assert s.query(JobRow).count() == 2
        assert len(transport.sent) == 1
    finally:
        r.delete(HERD_PREFIX + "ghost@test")


def test_metrics_report_queue_latency_tokens_money_and_refusals(stack, gateway):
    from prometheus_client.parser import text_string_to_metric_families

    key, _ = stack.account(10_000)
    oa = client(gateway, key)
    oa.completions.create(model="smollm2", prompt="Count: 1, 2,", max_tokens=6)
    with pytest.raises(openai.APIStatusError):
        oa.completions.create(model="smollm2", prompt="hi", max_tokens=4, extra_body={"fee": 1})
    text = httpx.get(gateway + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("llamas_admissions_total") >= 1
    assert value("llamas_refusals_total", reason="InsufficientFee") >= 1
    assert value("llamas_tokens_generated_total") >= 6
    assert value("llamas_revenue_total") > 0
    assert value("llamas_jobs_finished_total", state="done") >= 1
    for hist in ("llamas_queue_wait_seconds", "llamas_latency_seconds", "llamas_time_to_first_token_seconds"):
        assert value(hist + "_count") >= 1 and value(hist + "_bucket", le="+Inf") == value(hist + "_count")
    assert value("llamas_slots", model="smollm2") == 1
    assert ("llamas_busy_slots", (("model", "smollm2"),)) in samples
    assert "llamas_queue_depth" in text and "llamas_redeliveries_total" in text
