"""Real worker processes with the real model, over the real broker."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import stream
from llama_tasks.errors import (
    BadGrammar,
    BadSignature,
    BadStop,
    ContextOverflow,
    EmptyPrompt,
    Expired,
    InvalidMaxTokens,
    Replayed,
    SamplingOutOfRange,
    UnknownSigner,
    Unsigned,
    WrongModel,
)

from tests.events import captured_events, text_forms

pytestmark = pytest.mark.slow


def events(r, job_id):
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(stream.key(job_id))
    ]


def test_ten_jobs_on_two_processes_load_the_model_once_per_process(start_worker, send, make_job, r):
    worker = start_worker(concurrency=2)
    results = [send(make_job(max_tokens=8)[0]) for _ in range(10)]
    docs = [res.get(timeout=120) for res in results]
    assert all(d["load_count"] == 1 for d in docs)
    assert all(d["worker"] == worker.name for d in docs)
    assert len({d["pid"] for d in docs}) <= 2
    assert worker.output().count("loaded smollm2") == 2  # one load per child, none per task
    for d in docs:
        assert d["model_id"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        assert d["completion_tokens"] == 8 and d["finish_reason"] == "length"
        assert set(d["timings"]) == {"queue_wait_s", "prompt_s", "generation_s", "tokens_per_s"}


def test_heartbeat_describes_the_worker(start_worker, r):
    worker = start_worker(concurrency=2)
    doc = worker.wait_ready(r)
    assert doc["worker"] == worker.name and doc["model"] == "smollm2"
    assert doc["slots"] == 2 and doc["busy"] == 0 and doc["gpus"] == []
    assert doc["queue"] == "llama.smollm2" and len(doc["model_id"]) == 64
    assert r.pttl(f"llamas:herd:{worker.name}") > 0  # it expires unless refreshed


def _rejections(make_job):
    now = time.time()
    other_key = Ed25519PrivateKey.generate()
    signed, _ = make_job()
    tampered = json.loads(json.dumps(signed))
    tampered["payload"]["max_tokens"] = 99
    return [
        ("unsigned", {"payload": make_job()[1].to_payload()}, Unsigned),
        ("bad signature", tampered, BadSignature),
        ("another key", make_job(key=other_key)[0], UnknownSigner),
        ("expired", make_job(expires_at=now - 1)[0], Expired),
        ("wrong model", make_job(model="some-other-model")[0], WrongModel),
    ]


def test_every_rejection_runs_nothing_and_is_not_retried(start_worker, send, make_job, r):
    worker = start_worker(concurrency=1)
    for label, envelope, error in _rejections(make_job):
        res = send(envelope)
        with pytest.raises(error):
            res.get(timeout=60)
        job_id = envelope["payload"]["job_id"]
        assert r.exists(stream.key(job_id)) == 0, f"{label}: something was generated"
        assert res.state == "FAILURE", label
    log = worker.output()
    for name in ("Unsigned", "BadSignature", "UnknownSigner", "Expired", "WrongModel"):
        assert f"refused: {name}" in log  # the reason is logged
    assert "Retry" not in log


def test_a_replayed_envelope_is_refused_after_the_first_run(start_worker, send, make_job, r):
    start_worker(concurrency=1)
    envelope, job = make_job(max_tokens=4)
    first = send(envelope).get(timeout=60)
    assert first["completion_tokens"] == 4
    with pytest.raises(Replayed):
        send(envelope).get(timeout=60)
    # The replay wrote nothing: one attempt started, one ended.
    kinds = [e["event"] for e in events(r, job.job_id)]
    assert kinds.count("start") == 1 and kinds.count("end") == 1


@pytest.mark.parametrize(
    "fields,error",
    [
        (dict(max_tokens=0), InvalidMaxTokens),
        (dict(prompt=""), EmptyPrompt),
        (dict(temperature=5.0), SamplingOutOfRange),
        (dict(grammar="root ::= [1-5"), BadGrammar),
        (dict(prompt="word " * 1500, max_tokens=1000), ContextOverflow),
    ],
)
def test_invalid_input_is_a_typed_error_with_its_numbers(start_worker, send, make_job, r, fields, error):
    start_worker(concurrency=1)
    envelope, job = make_job(**fields)
    with pytest.raises(error) as info:
        send(envelope).get(timeout=60)
    if error is ContextOverflow:
        assert info.value.max_tokens == 1000 and info.value.n_ctx == 2048
        assert info.value.prompt_tokens > 1048
    assert [e["event"] for e in events(r, job.job_id)] == ["start", "error"]


def test_stop_strings_and_max_tokens_over_the_broker(start_worker, send, make_job):
    start_worker(concurrency=1)
    free = send(make_job(prompt="Count: 1, 2, 3,", max_tokens=40)[0]).get(timeout=60)
    stopped = send(make_job(prompt="Count: 1, 2, 3,", max_tokens=40, stop=[" 6"])[0]).get(timeout=60)
    assert free["finish_reason"] == "length" and free["completion_tokens"] == 40
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free["text"][: free["text"].index(" 6")]


def test_grammar_gives_exactly_one_digit(start_worker, send, make_job):
    start_worker(concurrency=1)
    doc = send(make_job(prompt="Rate this review 1-5: 'Great product!' Rating:", max_tokens=3,
                        grammar="root ::= [1-5]", temperature=0.7)[0]).get(timeout=60)
    assert doc["text"] in {"1", "2", "3", "4", "5"} and doc["completion_tokens"] == 1


def test_the_stream_holds_the_same_text_as_the_result(start_worker, send, make_job, r):
    start_worker(concurrency=1)
    envelope, job = make_job(prompt=None, messages=[{"role": "user", "content": "Tell me about llamas."}],
                             max_tokens=60)
    res = send(envelope)
    text, last = stream.collect_text(stream.follow(r, job.job_id, timeout_s=60))
    doc = res.get(timeout=60)
    assert text == doc["text"] and text
    assert last == {"event": "end", "attempt": "1", "finish_reason": doc["finish_reason"]}
    assert 0 < r.ttl(stream.key(job.job_id)) <= 3600


# Exactly 300 lowercase letters: the model cannot stop early, so the job is
# long enough to be killed in the middle.
LONG_GRAMMAR = 'root ::= [a-z]{300}'


def test_sigkill_of_the_busy_child_still_yields_exactly_one_result(start_worker, send, make_job, r):
    worker = start_worker(concurrency=2)
    envelope, job = make_job(prompt="Letters:", max_tokens=300, grammar=LONG_GRAMMAR, temperature=0.0)
    res = send(envelope)
    first = next(stream.follow(r, job.job_id, timeout_s=60))
    assert first["event"] == "start"
    # Wait for the first token, so the kill lands mid-generation.
    for event in stream.follow(r, job.job_id, timeout_s=60):
        if event["event"] == "token":
            break
    killed = int(first["pid"])
    os.kill(killed, signal.SIGKILL)
    doc = res.get(timeout=120)
    assert doc["pid"] != killed
    assert len(doc["text"]) == 300 and doc["finish_reason"] == "stop"
    assert res.state == "SUCCESS"
    kinds = [e["event"] for e in events(r, job.job_id)]
    assert kinds.count("start") == 2 and kinds.count("end") == 1  # one lost attempt, one completion
    text, _ = stream.collect_text(iter(events(r, job.job_id)))
    assert text == doc["text"]
    assert "WorkerLostError" in worker.output() or "SIGKILL" in worker.output()


def test_worker_refuses_to_start_when_the_model_file_is_missing_or_changed(start_worker, tmp_path, r):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not the registered bytes")
    home = tmp_path / "home"
    home.mkdir()
    (home / "herder.pub").write_text((os.environ["LLAMAS_HOME"] + "/herder.pub") and open(os.environ["LLAMAS_HOME"] + "/herder.pub").read())
    (home / "models.json").write_text(json.dumps({
        "changed": {"path": str(fake), "sha256": "0" * 64},
        "missing": {"path": str(tmp_path / "nope.gguf"), "sha256": "0" * 64},
    }))
    for model, message in [("changed", "has sha256"), ("missing", "GGUF file not found")]:
        worker = start_worker(concurrency=1, wait=False, LLAMAS_HOME=str(home), LLAMAS_MODEL=model)
        assert worker.proc.wait(timeout=60) != 0
        out = worker.output()
        assert "llamas worker refuses to start" in out and message in out
        assert "loaded" not in out


def test_prompts_and_completions_stay_out_of_the_log_and_the_events(start_worker, send, make_job, celery_app):
    worker = start_worker(concurrency=1)
    secret = f"zebra{uuid.uuid4().hex[:12]}"
    with captured_events(celery_app) as events:
        # Sent as a careless sender would (Celery's default argsrepr is the full envelope).
        done = send(make_job(prompt=f"Repeat after me: {secret} {secret} {secret}.", max_tokens=24)[0])
        refused = send(make_job(prompt="Hello", stop=["never " + secret * 5])[0])
        doc = done.get(timeout=60)
        with pytest.raises(BadStop):
            refused.get(timeout=60)
        events.wait_for_tasks({("task-succeeded", done.id), ("task-failed", refused.id)})
    completion = doc["text"].strip()
    assert len(completion) >= 20, doc  # long enough not to turn up by chance
    log = worker.output()
    # What the worker's own events carry (the test's task-sent events are the sender's business).
    shown = json.dumps([e for e in events.events if e.get("type") != "task-sent"], ensure_ascii=False)
    for place, text in (("log", log), ("events", shown)):
        for form in text_forms(secret) + text_forms(completion):
            assert form not in text, f"{form!r} appears in the worker's {place}"
    # Ids, sizes and counts remain, and the result store keeps the text.
    assert "succeeded in" in log and "refused: BadStop" in log
    assert f"{doc['completion_tokens']} completion tokens" in log and doc["job_id"] in log
    received = [e for e in events.events if e.get("type") == "task-received" and e.get("uuid") == done.id]
    assert received and doc["job_id"] in received[0]["args"]
    assert done.result["text"] == doc["text"] and secret not in json.dumps(received)
