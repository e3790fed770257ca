"""Signed receipts: a job's whole life on the stub transport, then its receipt against the ledger.

Receipts are checked the ways a requester gets them (the service, the HTTP
gateway, the CLI) on SQLite and PostgreSQL; tampering with any part of one
must fail verification, offline, with the check that failed named.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from llama_tasks import signing
from router.cli import receipts as cli_receipts
from router.core import fees, ledger, receipts
from router.core.errors import InvalidReceipt, JobNotFinished, ReceiptMismatch, UnknownAccount, UnknownJob
from router.core.models import JobRow, Transfer
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway.app import create_app
from router.herder import stub

DEPOSIT = 100_000
#: Prompt tokens the scripted worker says it found in its cache (charged at ``CACHED_FEE``).
CACHED = 2
CACHED_FEE = 0


class Clock:
    """Time the test moves by hand (from now: workers check envelopes' expiry against real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Life:
    """A herder on the stub transport with two funded requesters."""

    svc: HerderService
    transport: stub.StubTransport
    key: str
    other: str
    clock: Clock

    def worker(self, text: str = "Hello there, friend.") -> stub.StubWorker:
        """The scripted worker, reporting ``CACHED`` prompt tokens from its cache."""
        return stub.scripted_worker(self.svc.public_key, self.svc.counter.models(), text,
                                    report=lambda doc: doc | {"cached_tokens": CACHED})

    def transfers(self, job_id: str) -> dict[str, int]:
        """The job's transfers summed by kind, read straight from the ledger."""
        sums: dict[str, int] = {}
        with self.svc.sessions.begin() as s:
            for kind, amount in s.execute(select(Transfer.kind, Transfer.amount).where(Transfer.job_id == job_id)):
                sums[kind] = sums.get(kind, 0) + int(amount)
        return sums


def make_life(tmp_path: Path, redis_url: str, ledger_url: str, key: Ed25519PrivateKey) -> Life:
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, max_attempts=2,
                              fee_per_cached_token=CACHED_FEE)
    transport, clock = stub.StubTransport(), Clock()
    svc = stub.build(settings, transport=transport, slots=2, clock=clock, key=key)
    with svc.sessions.begin() as s:
        _, api_key = ledger.create_account(s, "requester", DEPOSIT)
        _, other = ledger.create_account(s, "someone-else", DEPOSIT)
    return Life(svc, transport, api_key, other, clock)


@pytest.fixture
def life(tmp_path: Path, redis_url: str, ledger_url: str, private_key: Ed25519PrivateKey) -> Life:
    """A fresh herder per test, on SQLite and PostgreSQL, signing with the test home's key."""
    return make_life(tmp_path, redis_url, ledger_url, private_key)


@dataclass
class Issued:
    """One done job's receipt, for the tests that only read or tamper with it."""

    life: Life
    job_id: str
    receipt: dict[str, Any]

    @property
    def payload(self) -> dict[str, Any]:
        return self.receipt["payload"]


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
           private_key: Ed25519PrivateKey) -> Iterator[Issued]:
    """A receipt issued once per module on SQLite (the tampering tests need no ledger of their own)."""
    home = tmp_path_factory.mktemp("receipts")
    life = make_life(home, redis_url, f"sqlite:///{home / 'ledger.db'}", private_key)
    job = life.svc.submit(life.key, Submission(prompt="Say hello", max_tokens=16, multiplier=1.5))["job_id"]
    life.transport.join(life.svc, life.worker())
    yield Issued(life, job, life.svc.receipt(life.key, job))
    life.svc.sessions.kw["bind"].dispose()


def changed(value: Any) -> Any:
    """Another value of the same kind (or a value where there was none)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"no change for {value!r}")


# --- what a receipt says ------------------------------------------------------


def test_a_done_jobs_receipt_is_what_the_ledger_and_the_response_say(life: Life) -> None:
    job = life.svc.submit(life.key, Submission(prompt="Say hello", max_tokens=16, multiplier=2))["job_id"]
    life.transport.join(life.svc, life.worker())
    response = life.transport.responses[job]

    envelope = life.svc.receipt(life.key, job)
    payload = receipts.verify(json.loads(json.dumps(envelope)), life.svc.public_key)

    sums = life.transfers(job)
    assert payload["held"] == sums["hold"] == response["offered"]
    assert payload["charged"] == sums.get("capture", 0) + sums.get("earn", 0) == response["charged"] > 0
    assert payload["refunded"] == sums.get("release", 0) == response["refunded"]
    assert payload["charged"] + payload["refunded"] == payload["held"]
    with life.svc.sessions.begin() as s:
        row = s.scalars(select(JobRow).where(JobRow.id == job)).one()
        assert (payload["base_fee"], payload["fee_per_token"], payload["fee_per_cached_token"]) == (
            row.base_fee, row.fee_per_token, row.fee_per_cached_token)
        assert (payload["created_at"], payload["dispatched_at"], payload["finished_at"]) == (
            row.created_at, row.dispatched_at, row.finished_at)
    assert payload["kind"] == "llamas.receipt" and payload["version"] == 1
    assert envelope["key_id"] == signing.key_id(life.svc.public_key)
    assert (payload["job_id"], payload["account"], payload["state"], payload["model"]) == (
        job, "requester", "done", "smollm2")
    assert payload["model_id"] == life.svc.counter.models()["smollm2"].model_id
    assert (payload["prompt_tokens"], payload["completion_tokens"], payload["cached_tokens"]) == (
        response["prompt_tokens"], response["completion_tokens"], CACHED)
    assert (payload["bid_ppm"], payload["multiplier"]) == (2_000_000, "2")
    assert payload["quote"] * 2 == payload["held"] and payload["worker"] == stub.worker_name("smollm2")
    assert payload["fee_per_cached_token"] == CACHED_FEE
    assert payload["created_at"] <= payload["dispatched_at"] <= payload["finished_at"] <= payload["issued_at"]
    assert "operator" not in payload  # no operator's worker answered: the house took the whole charge


def test_the_model_id_is_the_one_the_job_ran_with_not_the_registrys_now(life: Life) -> None:
    job = life.svc.submit(life.key, Submission(prompt="Say hello", max_tokens=4))["job_id"]
    life.transport.join(life.svc, life.worker())
    registered = life.svc.counter.models()["smollm2"].model_id
    with life.svc.sessions.begin() as s:
        row = s.scalars(select(JobRow).where(JobRow.id == job)).one()
        assert row.model_id == registered  # as the worker's result reported it
        row.model_id = "f" * 64  # as if the name had since been re-registered for another file
    payload = receipts.verify(life.svc.receipt(life.key, job), life.svc.public_key)
    assert payload["model_id"] == "f" * 64


def test_jobs_that_end_without_an_answer_get_receipts_that_refund_everything(life: Life) -> None:
    svc, key = life.svc, life.key
    for i in range(2):
        svc.submit(key, Submission(prompt=f"Take a slot {i}", max_tokens=8))
    cancelled = svc.submit(key, Submission(prompt="Never mind", max_tokens=8))["job_id"]
    expired = svc.submit(key, Submission(prompt="In a hurry", max_tokens=8, deadline_s=5))["job_id"]
    svc.cancel(key, cancelled)
    life.clock.now += 10
    svc.tick()
    life.transport.join(svc, life.worker())

    def crashing(envelope: dict[str, Any], task_id: str) -> dict[str, Any]:
        raise RuntimeError("the GPU fell off")

    failed = svc.submit(key, Submission(prompt="Unlucky", max_tokens=8))["job_id"]
    life.transport.join(svc, crashing)

    for job, state in ((cancelled, "cancelled"), (expired, "expired"), (failed, "failed")):
        payload = receipts.verify(svc.receipt(key, job), svc.public_key)
        sums = life.transfers(job)
        assert payload["state"] == state and payload["charged"] == 0 and "capture" not in sums
        assert payload["held"] == payload["refunded"] == sums["hold"] == sums["release"]
        assert payload["completion_tokens"] is None
    assert receipts.verify(svc.receipt(key, failed), svc.public_key)["dispatched_at"] is not None


def test_a_raised_bid_is_two_holds_and_the_receipt_sums_both(life: Life) -> None:
    svc, key = life.svc, life.key
    for i in range(2):
        svc.submit(key, Submission(prompt=f"Take a slot {i}", max_tokens=8))
    job = svc.submit(key, Submission(prompt="Me next", max_tokens=8))["job_id"]
    svc.raise_bid(key, job, None, 2.5)
    life.transport.join(svc, life.worker())

    payload = receipts.verify(svc.receipt(key, job), svc.public_key)
    with svc.sessions.begin() as s:
        holds = list(s.scalars(select(Transfer.amount).where(Transfer.job_id == job, Transfer.kind == "hold")))
    assert len(holds) == 2 and payload["held"] == sum(holds) == life.transport.responses[job]["offered"]
    # The bid is what the hold buys, rounded down to a millionth: exact as an integer and as a decimal.
    assert payload["bid_ppm"] == fees.bid_ppm(payload["held"], payload["quote"]) >= 2_500_000
    assert Decimal(payload["multiplier"]) == Decimal(payload["bid_ppm"]) / fees.PPM


def test_an_operators_share_counts_as_charged_and_the_operator_is_named(life: Life) -> None:
    svc, key = life.svc, life.key
    job = svc.submit(key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    life.transport.join(svc, life.worker())
    with svc.sessions.begin() as s:
        requester = ledger.account_by_key(s, key)
        operator, _ = ledger.create_account(s, "acme", 0)
        # A settlement that paid an operator: its share leaves escrow as ``earn``, the rest as ``capture``.
        ledger.hold(s, requester, 100, "settled-with-operator")
        ledger.capture(s, 30, "settled-with-operator")
        ledger.earn(s, operator, 10, "settled-with-operator")
        ledger.release(s, requester, 60, "settled-with-operator")
        assert receipts.figures(s, "settled-with-operator") == receipts.Figures(held=100, charged=40, refunded=60)
        s.scalars(select(JobRow).where(JobRow.id == job)).one().operator = "acme"

    payload = receipts.verify(svc.receipt(key, job), svc.public_key)
    assert payload["operator"] == "acme" and set(payload) == set(receipts.FIELDS) | {"operator"}


@pytest.mark.parametrize("ppm, text", [(1_000_000, "1"), (1_500_000, "1.5"), (1_333_333, "1.333333"),
                                       (12_000_001, "12.000001"), (999_999, "0.999999")])
def test_the_multiplier_is_the_bid_as_an_exact_decimal(ppm: int, text: str) -> None:
    assert receipts.multiplier_text(ppm) == text


# --- who may have one, and when -------------------------------------------------


def test_only_the_owner_gets_a_receipt_and_only_once_the_job_has_ended(life: Life) -> None:
    svc, key = life.svc, life.key
    running = svc.submit(key, Submission(prompt="Take a slot", max_tokens=8))["job_id"]
    svc.submit(key, Submission(prompt="Take the other slot", max_tokens=8))
    queued = svc.submit(key, Submission(prompt="Wait", max_tokens=8))["job_id"]

    for job, state in ((running, "running"), (queued, "queued")):
        with pytest.raises(JobNotFinished) as info:
            svc.receipt(key, job)
        assert (info.value.job_id, info.value.state) == (job, state)
    life.transport.join(svc, life.worker())
    for job in (running, queued, "no-such-job"):
        with pytest.raises(UnknownJob):
            svc.receipt(life.other, job)
    with pytest.raises(UnknownJob):
        svc.receipt(key, "no-such-job")
    with pytest.raises(UnknownAccount):
        svc.receipt("llm_not-a-key", running)
    assert receipts.verify(svc.receipt(key, queued), svc.public_key)["state"] == "done"


def test_a_job_whose_row_and_ledger_disagree_gets_no_signature(life: Life, caplog: Any) -> None:
    job = life.svc.submit(life.key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    life.transport.join(life.svc, life.worker())
    with life.svc.sessions.begin() as s:
        row = s.scalars(select(JobRow).where(JobRow.id == job)).one()
        row.charged, charged = row.charged + 1, row.charged

    with caplog.at_level(logging.ERROR, logger="router.core.receipts"), pytest.raises(ReceiptMismatch) as info:
        life.svc.receipt(life.key, job)
    assert (info.value.job_id, info.value.figure, info.value.job_row, info.value.ledger) == (
        job, "charged", charged + 1, charged)
    assert job in caplog.text


def test_a_job_whose_escrow_is_not_empty_gets_no_signature(life: Life) -> None:
    job = life.svc.submit(life.key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    life.transport.join(life.svc, life.worker())
    with life.svc.sessions.begin() as s:
        # Row and ledger agree on every figure, yet 5 held for the job went neither to a charge nor back.
        ledger.hold(s, ledger.account_by_name(s, "requester"), 5, job)
        s.scalars(select(JobRow).where(JobRow.id == job)).one().offered += 5
    with pytest.raises(ReceiptMismatch) as info:
        life.svc.receipt(life.key, job)
    assert (info.value.figure, info.value.job_row, info.value.ledger) == ("held - charged - refunded", 0, 5)


# --- verification ---------------------------------------------------------------


def test_a_receipt_has_exactly_the_fields_the_tampering_tests_cover(issued: Issued) -> None:
    assert set(issued.payload) == set(receipts.FIELDS)
    assert all(issued.payload[f] is not None for f in receipts.FIELDS)


@pytest.mark.parametrize("field", receipts.FIELDS)
def test_changing_any_field_of_the_payload_fails_the_signature(issued: Issued, field: str) -> None:
    envelope = copy.deepcopy(issued.receipt)
    envelope["payload"][field] = changed(envelope["payload"][field])
    with pytest.raises(InvalidReceipt) as info:
        receipts.verify(envelope, issued.life.svc.public_key)
    assert info.value.check == "signature"


def test_adding_or_removing_a_field_fails_the_signature(issued: Issued) -> None:
    added, removed = copy.deepcopy(issued.receipt), copy.deepcopy(issued.receipt)
    added["payload"]["operator"] = "mallory"
    del removed["payload"]["charged"]
    for envelope in (added, removed):
        with pytest.raises(InvalidReceipt) as info:
            receipts.verify(envelope, issued.life.svc.public_key)
        assert info.value.check == "signature"


def test_a_changed_key_id_or_signature_fails_and_says_which(issued: Issued) -> None:
    public = issued.life.svc.public_key
    wrong_id = issued.receipt | {"key_id": "0" * 16}
    sig = base64.b64decode(issued.receipt["sig"])
    flipped = issued.receipt | {"sig": base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()}
    forged = issued.receipt | {"sig": signing.sign(issued.payload, Ed25519PrivateKey.generate())["sig"]}
    for envelope, check in ((wrong_id, "key_id"), (flipped, "signature"), (forged, "signature"),
                            (issued.receipt | {"sig": "not base64!"}, "signature")):
        with pytest.raises(InvalidReceipt) as info:
            receipts.verify(envelope, public)
        assert info.value.check == check, envelope
    assert receipts.verify(issued.receipt, public) == issued.payload


def test_a_receipt_checked_with_another_key_fails(issued: Issued) -> None:
    with pytest.raises(InvalidReceipt) as info:
        receipts.verify(issued.receipt, Ed25519PrivateKey.generate().public_key())
    assert info.value.check == "key_id"


@pytest.mark.parametrize("envelope", [None, [], {}, {"payload": [], "key_id": "k", "sig": "s"},
                                      {"payload": {"kind": "llamas.receipt"}, "key_id": "k"}])
def test_what_is_not_an_envelope_fails_its_shape(envelope: Any) -> None:
    with pytest.raises(InvalidReceipt) as info:
        receipts.verify(envelope, Ed25519PrivateKey.generate().public_key())
    assert info.value.check == "shape"


def test_a_signed_payload_that_is_no_receipt_is_refused(issued: Issued, private_key: Ed25519PrivateKey) -> None:
    """Signed by the herder, yet not a version 1 receipt (a work envelope, say)."""
    public = private_key.public_key()
    payload = issued.payload
    for other, check in ((payload | {"kind": "llamas.work"}, "kind"), (payload | {"version": 2}, "version"),
                         ({k: v for k, v in payload.items() if k != "held"}, "shape"),
                         (payload | {"tip": 1}, "shape"), (payload | {"held": 1.5}, "shape")):
        with pytest.raises(InvalidReceipt) as info:
            receipts.verify(signing.sign(other, private_key), public)
        assert info.value.check == check


# --- the HTTP gateway -------------------------------------------------------------


def test_the_gateway_serves_the_receipt_to_its_owner_only(life: Life) -> None:
    svc, key = life.svc, life.key
    http = TestClient(create_app(lambda: svc), raise_server_exceptions=False)
    done = svc.submit(key, Submission(prompt="Say hello", max_tokens=8))["job_id"]
    life.transport.join(svc, life.worker())
    running = svc.submit(key, Submission(prompt="Still going", max_tokens=8))["job_id"]

    def get(job: str, api_key: str | None = key) -> Any:
        return http.get(f"/jobs/{job}/receipt",
                        headers={"Authorization": f"Bearer {api_key}"} if api_key else {})

    reply = get(done)
    assert reply.status_code == 200, reply.text
    payload = receipts.verify(reply.json(), svc.public_key)
    assert payload["job_id"] == done and payload["charged"] == life.transport.responses[done]["charged"]

    other = get(done, life.other)
    assert other.status_code == 404 and other.json()["error"]["code"] == "UnknownJob"
    assert get("no-such-job").status_code == 404
    assert get(done, None).status_code == 401
    open_job = get(running)
    error = open_job.json()["error"]
    assert open_job.status_code == 409 and error["code"] == "JobNotFinished" and error["type"] == "job_not_finished"
    assert (error["job_id"], error["state"]) == (running, "running") and running in error["message"]

    with svc.sessions.begin() as s:
        s.scalars(select(JobRow).where(JobRow.id == done)).one().refunded += 1
    mismatch = get(done)
    assert mismatch.status_code == 500 and mismatch.json()["error"]["code"] == "ReceiptMismatch"


# --- the CLI ------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli_receipts.receipts_app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.output
    return result


def poison(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("offline verification reached for a connection")


def test_the_cli_verifies_a_receipt_offline(issued: Issued, tmp_path: Path, monkeypatch: Any) -> None:
    # Offline: verification must never reach for the broker, the herder or the ledger.
    for target in ("router.cli.receipts.herder", "router.core.db.make_engine", "redis.Redis.from_url"):
        monkeypatch.setattr(target, poison)
    receipt, pub = tmp_path / "receipt.json", tmp_path / "herder.pub"
    receipt.write_text(json.dumps(issued.receipt, indent=2))
    pub.write_text(signing.encode_public(issued.life.svc.public_key) + "\n")

    for key_args in (["--public-key", str(pub)], ["--public-key", pub.read_text().strip()], []):
        result = invoke("verify", str(receipt), *key_args)
        assert result.exit_code == 0, result.output
        line = result.output.strip()
        assert "\n" not in line and line.startswith("valid receipt: job " + issued.job_id)
        assert f"charged {issued.payload['charged']}" in line

    tampered = copy.deepcopy(issued.receipt)
    tampered["payload"]["charged"] += 1
    receipt.write_text(json.dumps(tampered))
    result = invoke("verify", str(receipt), "--public-key", str(pub))
    assert result.exit_code == 1 and "invalid receipt (signature)" in result.output
    assert len(result.output.strip().splitlines()) == 1

    receipt.write_text(json.dumps(issued.receipt))
    stranger = signing.encode_public(Ed25519PrivateKey.generate().public_key())
    result = invoke("verify", str(receipt), "--public-key", stranger)
    assert result.exit_code == 1 and "invalid receipt (key_id)" in result.output

    receipt.write_text(json.dumps(issued.receipt | {"sig": None}))
    assert "invalid receipt (shape)" in invoke("verify", str(receipt), "--public-key", str(pub)).output
    receipt.write_text("{not json")
    assert "is not JSON" in invoke("verify", str(receipt), "--public-key", str(pub)).output
    assert invoke("verify", str(tmp_path / "missing.json"), "--public-key", str(pub)).exit_code == 1
    receipt.write_text(json.dumps(issued.receipt))
    result = invoke("verify", str(receipt), "--public-key", "not-a-key")
    assert result.exit_code == 1
    assert "invalid public key: neither base64 nor a PEM public key, and no file 'not-a-key' exists" in result.output


class _Client:
    """The client's ``receipt`` answered by the service in process (no broker in this test)."""

    def __init__(self, svc: HerderService, key: str) -> None:
        self.svc, self.key = svc, key

    def receipt(self, job_id: str) -> dict[str, Any]:
        return self.svc.receipt(self.key, job_id)


def test_the_cli_gets_a_receipt_to_a_file_that_then_verifies(issued: Issued, tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    svc = issued.life.svc
    monkeypatch.setattr(cli_receipts, "herder", lambda key: _Client(svc, key))
    out = tmp_path / "receipt.json"
    result = invoke("get", issued.job_id, "--out", str(out), "--key", issued.life.key)
    assert result.exit_code == 0, result.output
    assert receipts.verify(json.loads(out.read_text()), svc.public_key)["job_id"] == issued.job_id
    assert invoke("verify", str(out)).exit_code == 0

    printed = invoke("get", issued.job_id, "--key", issued.life.key)
    assert receipts.verify(json.loads(printed.stdout), svc.public_key)["job_id"] == issued.job_id
    missing = invoke("get", "no-such-job", "--key", issued.life.key)
    assert missing.exit_code == 1 and "no such job: no-such-job" in missing.output
    keyless = invoke("get", issued.job_id)  # no --key and no LLAMAS_API_KEY: refused before any connection
    assert keyless.exit_code == 1 and "no API key: pass --key or set LLAMAS_API_KEY" in keyless.output
