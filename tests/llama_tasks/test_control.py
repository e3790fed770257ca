"""Init messages: only the herder's, for this worker, fresh and once (real Redis)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import control, signing
from llama_tasks.errors import (
    BadSignature,
    InitExpired,
    InitReplayed,
    InvalidRequest,
    NotAnInit,
    NotForThisWorker,
    UnknownSigner,
    Unsigned,
)
from llama_tasks.job import Job

HERDER = Ed25519PrivateKey.generate()
WORKER = "llama@test-control"
MODEL_ID = "ab" * 32


@pytest.fixture
def worker(r: Any) -> str:
    name = f"{WORKER}-{time.monotonic_ns()}"
    yield name
    r.delete(control.CONTROL_PREFIX + name)


def _accept(r: Any, envelope: Any, worker: str, now: float | None = None, started_at: float = 0.0) -> control.Init:
    return control.accept(r, envelope, HERDER.public_key(), worker, now or time.time(), started_at)


def test_a_signed_init_for_this_worker_is_accepted_once(r: Any, worker: str) -> None:
    envelope = control.build(worker, "smollm2", MODEL_ID, HERDER, time.time(), grace_s=5)
    nonce = control.send(r, envelope)
    received = control.receive(r, worker, 1)
    init = _accept(r, received, worker)
    assert (init.worker, init.model, init.model_id, init.nonce, init.grace_s) == (worker, "smollm2", MODEL_ID, nonce, 5)
    # The same message again (a copy pushed on the list): refused.
    with pytest.raises(InitReplayed):
        _accept(r, received, worker)
    assert control.receive(r, worker, 0.1) is None


def test_an_init_signed_by_another_key_or_altered_or_unsigned_is_refused(r: Any, worker: str) -> None:
    forged = control.build(worker, "smollm2", MODEL_ID, Ed25519PrivateKey.generate(), time.time())
    with pytest.raises(UnknownSigner):
        _accept(r, forged, worker)
    altered = control.build(worker, "smollm2", MODEL_ID, HERDER, time.time())
    altered["payload"]["model"] = "other"
    with pytest.raises(BadSignature):
        _accept(r, altered, worker)
    with pytest.raises(Unsigned):
        _accept(r, {"payload": altered["payload"]}, worker)
    with pytest.raises(Unsigned):
        _accept(r, "not json at all", worker)


def test_an_init_for_another_worker_is_refused(r: Any, worker: str) -> None:
    envelope = control.build("someone-else@host", "smollm2", MODEL_ID, HERDER, time.time())
    with pytest.raises(NotForThisWorker):
        _accept(r, envelope, worker)


def test_an_expired_init_or_one_issued_before_the_worker_started_is_refused(r: Any, worker: str) -> None:
    now = time.time()
    expired = control.build(worker, "smollm2", MODEL_ID, HERDER, now - 200, ttl_s=100)
    with pytest.raises(InitExpired):
        _accept(r, expired, worker, now=now)
    # Kept from before this worker's process started: a replay to a restarted worker.
    earlier = control.build(worker, "smollm2", MODEL_ID, HERDER, now - 10)
    with pytest.raises(InitExpired, match="before this worker started"):
        _accept(r, earlier, worker, now=now, started_at=now - 5)


def test_a_job_envelope_is_no_init_and_an_init_is_no_job(r: Any, worker: str) -> None:
    job = signing.sign({"job_id": "j", "model": "smollm2"}, HERDER)
    with pytest.raises(NotAnInit):
        _accept(r, job, worker)
    init = control.build(worker, "smollm2", MODEL_ID, HERDER, time.time())
    with pytest.raises(InvalidRequest):
        Job.from_payload(init["payload"])


@pytest.mark.parametrize("field, value", [("grace_s", -1), ("grace_s", "soon"), ("model", ""), ("nonce", 7),
                                          ("issued_at", True)])
def test_a_malformed_init_is_refused_even_when_signed(r: Any, worker: str, field: str, value: Any) -> None:
    payload = control.Init(worker, "smollm2", MODEL_ID, "n" * 32, time.time(), time.time() + 60).to_payload()
    payload[field] = value
    with pytest.raises(NotAnInit):
        _accept(r, signing.sign(payload, HERDER), worker)


def test_what_receive_returns_for_a_message_that_is_not_json(r: Any, worker: str) -> None:
    r.rpush(control.CONTROL_PREFIX + worker, b"\xff garbage")
    assert control.receive(r, worker, 1) == b"\xff garbage"
    r.rpush(control.CONTROL_PREFIX + worker, json.dumps({"a": 1}))
    assert control.receive(r, worker, 1) == {"a": 1}
