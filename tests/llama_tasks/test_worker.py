"""Real worker processes with the real model, over the real broker."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import stream
from llama_tasks.constants import GENERATE_TASK as GENERATE
from llama_tasks.errors import (
    BadGrammar,
    BadSignature,
    BadStop,
    ContextOverflow,
    EmptyPrompt,
    Expired,
    InvalidMaxTokens,
    LeaseEnding,
    Replayed,
    SamplingOutOfRange,
    UnknownSigner,
    Unsigned,
    WrongModel,
)
from tests.events import captured_events, text_forms
from tests.processes import wait_for

pytestmark = pytest.mark.slow


def events(r, job_id):
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in r.xrange(stream.key(job_id))
    ]


MODEL_ID = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"



def first(doc: dict[str, Any]) -> dict[str, Any]:
    """Choice 0 of a worker's result document."""
    return doc["choices"][0]


def collect_text(events: Iterator[dict[str, str]]) -> tuple[str, dict[str, str]]:
    """Join the token text of a stream's last attempt; return it with the closing event."""
    text: list[str] = []
    last: dict[str, str] = {}
    for event in events:
        if event["event"] == "start":
            text = []
        elif event["event"] == "token":
            text.append(event["text"])
        last = event
    return "".join(text), last


def test_ten_jobs_on_one_batching_process_load_the_model_once(start_worker, send, make_job, r):
    worker = start_worker(concurrency=4)
    results = [send(make_job(max_tokens=8)[0]) for _ in range(10)]
    docs = [res.get(timeout=120) for res in results]
    assert all(d["load_count"] == 1 for d in docs)
    assert all(d["worker"] == worker.name for d in docs)
    assert len({d["pid"] for d in docs}) == 1 == worker.output().count("loaded smollm2")  # none per task
    assert "slots=4" in worker.output()
    for d in docs:
        assert d["model_id"] == MODEL_ID
        assert d["completion_tokens"] == 8 and first(d)["finish_reason"] == "length"
        assert set(d["timings"]) == {"queue_wait_s", "engine_queue_s", "prompt_s", "generation_s", "tokens_per_s"}
        assert d["choices"] == [{"index": 0, "text": first(d)["text"], "finish_reason": "length", "completion_tokens": 8,
                                 "logprobs": None}]
        assert "text" not in d and "finish_reason" not in d  # choice 0 is sent once, in choices


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_pool_other_than_threads_is_refused_by_name(start_worker, pool):
    worker = start_worker(wait=False, pool=pool)
    assert worker.proc.wait(timeout=60) == 2
    assert f"-P {pool} is not supported" in worker.output()


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
        # A generation leaves 5 s before its lease for its answer: a lease ending in 5.5 s is too near.
        ("lease ending", make_job(expires_at=now + 5.5)[0], LeaseEnding),
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
    for name in ("Unsigned", "BadSignature", "UnknownSigner", "Expired", "LeaseEnding", "WrongModel"):
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


def test_a_message_redelivered_after_its_attempt_finished_returns_the_same_answer(start_worker, make_job,
                                                                                   celery_app, r):
    # A worker that answered and died before acknowledging: Redis hands the same
    # message (the same task id) to the next worker, which must not fail the job.
    start_worker(concurrency=1)
    envelope, job = make_job(max_tokens=4)
    task_id = uuid.uuid4().hex
    first = celery_app.send_task(GENERATE, args=[envelope], queue="llama.smollm2", task_id=task_id).get(timeout=60)
    again = celery_app.send_task(GENERATE, args=[envelope], queue="llama.smollm2", task_id=task_id).get(timeout=60)
    assert again == first  # the kept answer, signed as it was: the herder settles it once
    kinds = [e["event"] for e in events(r, job.job_id)]
    assert kinds.count("start") == 1 and kinds.count("end") == 1  # generated once


def test_a_later_attempt_gets_the_whole_time_limit_however_long_ago_the_job_began(start_worker, send, make_job):
    # Attempt 2 of a job first sent a minute ago, on a worker whose limit is 5 s:
    # the limit counts from this attempt's start, not the job's.
    start_worker(concurrency=1, LLAMAS_SOFT_TIME_LIMIT_S="5")
    envelope, _ = make_job(attempt=2, issued_at=time.time() - 60, max_tokens=8)
    doc = send(envelope).get(timeout=60)
    assert (doc["attempt"], first(doc)["finish_reason"], doc["completion_tokens"]) == (2, "length", 8)


def test_a_message_that_arrives_late_stops_before_its_lease_ends(start_worker, send, make_job):
    # A broker outage held the message: its lease (the envelope's expiry) ends in 6 s, sooner than
    # the 60 s soft limit. The worker stops 2 s (hard - soft) before it and answers with what it
    # made, instead of answering after the herder has given the attempt up and sent it again.
    start_worker(concurrency=1, LLAMAS_SOFT_TIME_LIMIT_S="60", LLAMAS_TIME_LIMIT_S="62")
    envelope, _ = make_job(expires_at=time.time() + 6, max_tokens=1500, grammar="root ::= [a-z]{1500}")
    doc = send(envelope).get(timeout=60)
    assert first(doc)["finish_reason"] == "time_limit"
    assert 0 < doc["completion_tokens"] < 1500


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
    assert first(free)["finish_reason"] == "length" and free["completion_tokens"] == 40
    assert first(stopped)["finish_reason"] == "stop"
    assert first(stopped)["text"] == first(free)["text"][: first(free)["text"].index(" 6")]


def test_grammar_gives_exactly_one_digit(start_worker, send, make_job):
    start_worker(concurrency=1)
    doc = send(make_job(prompt="Rate this review 1-5: 'Great product!' Rating:", max_tokens=3,
                        grammar="root ::= [1-5]", temperature=0.7)[0]).get(timeout=60)
    assert first(doc)["text"] in {"1", "2", "3", "4", "5"} and doc["completion_tokens"] == 1


def test_the_stream_holds_the_same_text_as_the_result(start_worker, send, make_job, r):
    start_worker(concurrency=1)
    envelope, job = make_job(prompt=None, messages=[{"role": "user", "content": "Tell me about llamas."}],
                             max_tokens=60)
    res = send(envelope)
    text, last = collect_text(stream.follow(r, job.job_id, timeout_s=60))
    doc = res.get(timeout=60)
    assert text == first(doc)["text"] and text
    assert last == {"event": "end", "attempt": "1", "finish_reason": first(doc)["finish_reason"]}
    assert 0 < r.ttl(stream.key(job.job_id)) <= 3600


def test_every_choice_streams_its_text_and_logprobs_as_the_result_holds_them(start_worker, send, make_job, r):
    start_worker(concurrency=1)
    envelope, job = make_job(prompt=None, messages=[{"role": "user", "content": "Name a colour."}],
                             max_tokens=10, n=3, temperature=1.0, seed=9, logprobs=True, top_logprobs=1,
                             stop=["."])
    res = send(envelope)
    shown = list(stream.follow_text(r, job.job_id, timeout_s=60))
    doc = res.get(timeout=60)
    assert shown[-1]["event"] == "end" and not [e for e in shown if e["event"] == "restart"]
    for choice in doc["choices"]:
        mine = [e for e in shown if e["event"] == "token" and e["index"] == choice["index"]]
        assert "".join(e["text"] for e in mine) == choice["text"]
        assert [entry for e in mine for entry in e["logprobs"]] == choice["logprobs"]


# Exactly 300 lowercase letters: the model cannot stop early, so the job is
# long enough to be stopped in the middle.
LONG_GRAMMAR = 'root ::= [a-z]{300}'


def test_worker_refuses_to_start_when_the_model_file_is_missing_or_changed(start_worker, tmp_path, r):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not the registered bytes")
    home = tmp_path / "home"
    home.mkdir()
    (home / "herder.pub").write_text(Path(os.environ["LLAMAS_HOME"], "herder.pub").read_text())
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


def test_a_house_worker_without_the_house_key_refuses_to_start(start_worker, tmp_path):
    """Every result is signed: a worker with nothing to sign with would have every answer refused."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "herder.pub").write_text(Path(os.environ["LLAMAS_HOME"], "herder.pub").read_text())
    worker = start_worker(concurrency=1, wait=False, LLAMAS_HOME=str(home))
    assert worker.proc.wait(timeout=60) != 0
    out = worker.output()
    assert f"llamas worker refuses to start: the house's workers sign every result with {home / 'house.key'}" in out
    assert "`llamas keys generate`" in out and "Traceback" not in out and "loaded" not in out


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
    completion = first(doc)["text"].strip()
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
    assert first(done.result)["text"] == first(doc)["text"] and secret not in json.dumps(received)


def test_a_batching_worker_reports_busy_slots_and_stops_a_cancelled_job(start_worker, send, make_job, r):
    worker = start_worker(concurrency=3)
    jobs = [make_job(prompt="Letters:", max_tokens=300, grammar=LONG_GRAMMAR, temperature=0.0) for _ in range(3)]
    results = [send(envelope) for envelope, _ in jobs]
    for _, job in jobs:  # every job is generating
        for event in stream.follow(r, job.job_id, timeout_s=60):
            if event["event"] == "token":
                break
    beat = wait_for(lambda: (d := json.loads(r.get(f"llamas:herd:{worker.name}") or "{}")).get("busy") == 3 and d,
                    30, "a heartbeat with three busy slots")
    assert beat["slots"] == 3 and beat["jobs"] == 3
    r.set(f"llamas:cancel:{jobs[0][1].job_id}", 1, ex=60)
    docs = [res.get(timeout=180) for res in results]
    assert first(docs[0])["finish_reason"] == "cancelled" and docs[0]["completion_tokens"] < 300
    assert [first(d)["finish_reason"] for d in docs[1:]] == ["stop", "stop"]
    assert all(len(first(d)["text"]) == 300 for d in docs[1:])
    assert len({d["pid"] for d in docs}) == 1
    claim = json.loads(r.get(f"llamas:claim:{jobs[1][1].job_id}:1"))
    assert claim["worker"] == worker.name and claim["pid"] == docs[1]["pid"] and claim["state"] == "done"


def test_a_batching_worker_serves_one_gpu(start_worker):
    worker = start_worker(wait=False, LLAMAS_GPUS="0,1")
    assert worker.proc.wait(timeout=60) == 2
    assert "one worker process serves one GPU" in worker.output()
