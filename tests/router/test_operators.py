"""Operators earn their share of the jobs their workers serve: exactly, once, and only when their key proves it."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from llama_tasks import claims, signing
from llama_tasks.constants import GENERATE_TASK, RESULTS_STREAM
from router.cli.operators import operators_app
from router.core import ledger, operators, provenance
from router.core.db import alembic_config, make_engine, upgrade
from router.core.errors import InsufficientFunds, InvalidAccountName, InvalidPublicKey, OperatorExists, UnknownOperator
from router.core.models import REVENUE, JobRow, Transfer
from router.core.request import Submission
from router.core.service import RECONCILE_AFTER_S
from router.core.settings import HerderSettings, get_settings
from router.herder import stub

from .conftest import T0, Herder, run_together

DEPOSIT = 100_000
PPM = 1_000_000
TEXT = "Llamas hum softly when they are curious, worried, or simply content."
#: (max_tokens, multiplier, text) of jobs whose charges differ, several not divisible by 5 or 3.
JOBS = [(8, "1", "Hi."), (64, "1.5", TEXT), (3, "2.7", TEXT), (40, "1.01", "Llamas."), (16, "1.337", TEXT[:30])]


def register(herder: Herder, name: str) -> signing.OperatorSigner:
    """Operator ``name`` registered with a fresh key; returns what its workers sign with."""
    signer = stub.operator_signer(name)
    with herder.sessions.begin() as session:
        operators.register(session, name, signer.key.public_key())
    return signer


def running(herder: Herder, api_key: str, **fields: Any) -> JobRow:
    """A job admitted and dispatched: its first attempt is running."""
    job = herder.submit(api_key, **fields)
    assert job.id in herder.claim(slots=1_000)
    return herder.job(job.id)


def settle(herder: Herder, doc: dict[str, Any], claim: dict[str, Any] | None = None) -> JobRow | None:
    return herder.settle(doc, T0 + 60, claim)


def expected_transfers(row: JobRow, earned: int) -> list[tuple[str, int]]:
    """A settled job's transfers in order: hold, the operator's earn, the house's capture, the release."""
    assert row.charged is not None and row.refunded is not None
    moves = [("hold", row.offered), ("earn", earned), ("capture", row.charged - earned), ("release", row.refunded)]
    return [(kind, amount) for kind, amount in moves if amount]


@pytest.fixture
def alice(herder: Herder) -> str:
    return herder.account("alice", deposit=DEPOSIT)


# --- the split ------------------------------------------------------------------------


def test_the_share_is_rounded_down_in_integers() -> None:
    assert operators.share(98, 800_000) == 78  # 78.4: the house keeps 20
    assert operators.share(85, 800_000) == 68
    assert operators.share(1, 800_000) == 0
    assert operators.share(10, 333_333) == 3
    assert operators.share(7, 0) == 0 and operators.share(7, PPM) == 7
    assert operators.share(2**63 - 1, PPM) == 2**63 - 1  # no float anywhere: exact at the largest balance


@pytest.mark.parametrize("share", ["0", "0.8", "1", "0.333333"])
def test_settlement_splits_each_charge_exactly_between_the_operator_and_the_house(
        herder: Herder, alice: str, share: str) -> None:
    herder.configure(operator_share=Decimal(share))
    ppm = int(Decimal(share) * PPM)
    acme = register(herder, "acme")
    charges, earned_total = [], 0
    for max_tokens, multiplier, answer in JOBS:
        job = running(herder, alice, max_tokens=max_tokens, multiplier=multiplier)
        row = settle(herder, herder.result(job.id, answer, signer=acme))
        assert row is not None and row.operator == "acme" and row.charged
        earned = row.charged * ppm // PPM
        assert herder.transfers(job.id) == expected_transfers(row, earned)
        charges.append(row.charged)
        earned_total += earned
    if share not in ("0", "1"):
        assert any(charge * ppm % PPM for charge in charges), "no charge needed rounding"
    assert herder.balances("acme", REVENUE) == {"acme": earned_total, REVENUE: sum(charges) - earned_total}
    with herder.sessions() as session:
        found = operators.earnings(session, "acme")
    assert (found["earned"], found["paid_out"], found["balance"], found["jobs"]) == (earned_total, 0, earned_total, 5)
    herder.assert_books()


def test_a_house_worker_pays_the_house_everything_and_logs_nothing(
        herder: Herder, alice: str, caplog: pytest.LogCaptureFixture) -> None:
    register(herder, "acme")
    job = running(herder, alice, max_tokens=16)
    with caplog.at_level(logging.WARNING, logger="router.core.operators"):
        row = settle(herder, herder.result(job.id, TEXT))
    assert row is not None and row.operator is None
    assert herder.transfers(job.id) == expected_transfers(row, 0)
    assert herder.balances("acme", REVENUE) == {"acme": 0, REVENUE: row.charged}
    assert caplog.records == []


def test_a_redelivered_result_credits_the_operator_once(herder: Herder, alice: str) -> None:
    acme = register(herder, "acme")
    job = running(herder, alice, max_tokens=32, multiplier="1.5")
    doc = herder.result(job.id, TEXT, signer=acme)

    # The same result from the stream, the result store and a reclaimed entry, all at once.
    rows = run_together(6, lambda i: settle(herder, json.loads(json.dumps(doc))))

    settled = [row for row in rows if isinstance(row, JobRow)]
    assert len(settled) == 1 and rows.count(None) == 5, rows
    assert settle(herder, doc) is None
    row = herder.job(job.id)
    earned = operators.share(row.charged or 0, herder.settings.operator_share_ppm)
    assert herder.transfers(job.id) == expected_transfers(row, earned)
    assert herder.balance("acme") == earned
    herder.assert_books()


# --- forgeries are never settled -------------------------------------------------------------


def _forged(herder: Herder, job_id: str, acme: signing.OperatorSigner, bolt: signing.OperatorSigner,
            forgery: str) -> dict[str, Any]:
    genuine = herder.result(job_id, TEXT, signer=acme)
    doc = {k: v for k, v in genuine.items() if k not in (signing.ATTESTATION, "operator")}
    if forgery == "acme's key, claiming bolt":
        return herder.sign(doc | {"worker": "bolt/w@test"}, signing.OperatorSigner("bolt", acme.key))
    if forgery == "a stranger's key, claiming acme":
        return herder.sign(doc, signing.OperatorSigner("acme", Ed25519PrivateKey.generate()))
    if forgery == "acme's attestation, naming bolt":
        return genuine | {"operator": "bolt"}
    if forgery == "an unregistered operator":
        return herder.sign(doc | {"worker": "nobody/w@test"}, stub.operator_signer("nobody"))
    if forgery == "a claim without a signature":
        return doc | {"operator": "acme"}
    if forgery == "another worker's result":
        return genuine | {"worker": "acme/elsewhere@host"}
    if forgery == "text changed after signing":
        return genuine | {"choices": [genuine["choices"][0] | {"text": TEXT + " And more."}]}
    if forgery == "tokens raised after signing":
        return genuine | {"choices": [genuine["choices"][0] | {"completion_tokens": 30}]}
    if forgery == "garbage":
        return doc | {"operator": "acme", signing.ATTESTATION: "acme"}
    if forgery == "no proof of receipt":
        # Signed by acme's own key, but by a worker that never received the envelope: it lacks the secret.
        return herder.sign(doc, acme, secret=secrets.token_hex(32))
    if forgery == "bolt's worker, signed by bolt":
        return herder.sign(doc | {"worker": "acme/w@test"}, bolt)
    if forgery == "a house worker's name":
        return herder.sign(doc | {"worker": "w@test"}, acme)
    if forgery == "the house's name, acme's key":
        return herder.sign(doc | {"worker": "w@test"}, signing.OperatorSigner("", acme.key))
    raise AssertionError(forgery)


@pytest.mark.parametrize("forgery", [
    "acme's key, claiming bolt", "a stranger's key, claiming acme", "acme's attestation, naming bolt",
    "an unregistered operator", "a claim without a signature", "another worker's result",
    "text changed after signing", "tokens raised after signing", "garbage", "no proof of receipt",
    "bolt's worker, signed by bolt", "a house worker's name", "the house's name, acme's key",
])
def test_a_result_that_does_not_prove_its_worker_is_never_settled(
        herder: Herder, alice: str, forgery: str, caplog: pytest.LogCaptureFixture) -> None:
    acme, bolt = register(herder, "acme"), register(herder, "bolt")
    job = running(herder, alice, max_tokens=32)
    with caplog.at_level(logging.WARNING, logger="router.core.settlement"):
        assert settle(herder, _forged(herder, job.id, acme, bolt, forgery)) is None

    # Nothing moved: the attempt still runs (its lease would run out, and the job run again).
    assert herder.job(job.id).state == "running"
    assert herder.transfers(job.id) == [("hold", job.offered)]
    assert herder.balances("acme", "bolt", REVENUE) == {"acme": 0, "bolt": 0, REVENUE: 0}
    [record] = caplog.records
    line = record.getMessage()
    assert job.id in line and "ignoring" in line and TEXT[:20] not in line
    # The worker that did receive it is still paid for its own result.
    row = settle(herder, herder.result(job.id, TEXT, signer=acme))
    assert row is not None and row.operator == "acme"
    herder.assert_books()


def test_a_signature_replayed_onto_another_job_is_never_settled(herder: Herder, alice: str) -> None:
    acme = register(herder, "acme")
    first, second = (running(herder, alice, max_tokens=16) for _ in range(2))
    genuine = herder.result(first.id, TEXT, signer=acme)
    # Someone with broker access copies acme's attestation onto the other job's result.
    replayed = herder.result(second.id, TEXT) | {"operator": "acme", signing.ATTESTATION: genuine[signing.ATTESTATION]}
    # Or the whole signed document, re-targeted at the other job's task.
    retargeted = genuine | {"task_id": herder.job(second.id).task_id}

    assert settle(herder, replayed) is None and settle(herder, retargeted) is None
    by_acme = settle(herder, genuine)

    assert by_acme is not None and by_acme.operator == "acme"
    assert herder.job(second.id).state == "running"
    assert herder.balance("acme") == operators.share(by_acme.charged or 0, herder.settings.operator_share_ppm)
    herder.assert_books()


def test_the_first_signed_claim_decides_whose_result_is_paid(herder: Herder, alice: str) -> None:
    """Two workers received the attempt (a redelivery): only the one whose signed claim holds it is paid."""
    acme, bolt = register(herder, "acme"), register(herder, "bolt")
    job = running(herder, alice, max_tokens=32)
    claim = {"job_id": job.id, "attempt": job.attempt, "message": job.task_id, "state": "running",
             "worker": "acme/w@test", "pid": 1}
    held_by_acme = acme.sign_claim(claim)

    assert settle(herder, herder.result(job.id, TEXT, signer=bolt), held_by_acme) is None
    # A claim no registered key signed, or one for another attempt, decides nothing.
    forged = held_by_acme | {signing.CLAIM_SIGNATURE: stub.operator_signer("acme").sign_claim(claim)[
        signing.CLAIM_SIGNATURE]}
    other_attempt = acme.sign_claim(claim | {"attempt": job.attempt + 1})
    with herder.sessions() as session:
        assert provenance.claim_holder(session, herder.keys, held_by_acme, job) == signing.key_id(acme.key.public_key())
        assert provenance.claim_holder(session, herder.keys, forged, job) is None
        assert provenance.claim_holder(session, herder.keys, other_attempt, job) is None
        assert provenance.claim_holder(session, herder.keys, {"garbage": True}, job) is None
    assert herder.job(job.id).state == "running"
    row = settle(herder, herder.result(job.id, TEXT, signer=acme), held_by_acme)
    assert row is not None and row.operator == "acme" and herder.balance("bolt") == 0
    herder.assert_books()


def test_an_operator_earns_for_a_job_it_bought_itself(herder: Herder) -> None:
    """An operator is an ordinary account: its API key buys inference, and its worker may serve it."""
    acme = stub.operator_signer("acme")
    with herder.sessions.begin() as session:
        _, api_key = operators.register(session, "acme", signing.encode_public(acme.key.public_key()))
        ledger.deposit(session, ledger.account_by_name(session, "acme"), 1_000)
    assert api_key is not None
    job = running(herder, api_key, max_tokens=16)
    row = settle(herder, herder.result(job.id, TEXT, signer=acme))
    assert row is not None and row.operator == "acme" and row.charged
    earned = operators.share(row.charged, herder.settings.operator_share_ppm)
    assert herder.balance("acme") == 1_000 - row.charged + earned
    herder.assert_books()


# --- registering, earnings and payouts --------------------------------------------------------


def test_register_refuses_taken_names_bad_names_system_accounts_and_bad_keys(herder: Herder) -> None:
    register(herder, "acme")
    with herder.sessions.begin() as session:
        key = Ed25519PrivateKey.generate().public_key()
        with pytest.raises(OperatorExists):
            operators.register(session, "acme", key)
        for name in ("../evil", "a b", "", ".hidden", "x" * 101):
            with pytest.raises(InvalidAccountName):
                operators.register(session, name, key)
        with pytest.raises(InvalidAccountName, match="system account"):
            operators.register(session, "revenue", key)
        for bad in ("not base64!", "AAAA", signing.encode_public(key)[:-4]):
            with pytest.raises(InvalidPublicKey):
                operators.register(session, "bolt", bad)
        # A taken name left the transaction usable; a PEM public key is accepted too.
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        operator, api_key = operators.register(session, "bolt", pem)
        assert api_key is not None and operator.public_key == signing.encode_public(key)
    with herder.sessions() as session:
        assert [row["operator"] for row in operators.list_operators(session)] == ["acme", "bolt"]
        assert set(operators.public_keys(session)) == {"acme", "bolt"}


def test_payouts_leave_the_books_balanced_and_never_overdraw(herder: Herder, alice: str) -> None:
    acme = register(herder, "acme")
    job = running(herder, alice, max_tokens=64, multiplier="2")
    row = settle(herder, herder.result(job.id, TEXT, signer=acme))
    assert row is not None
    earned = herder.balance("acme")
    with herder.sessions.begin() as session:
        operators.payout(session, "acme", earned - 1)
    with herder.sessions.begin() as session:
        with pytest.raises(InsufficientFunds):
            operators.payout(session, "acme", 2)
        with pytest.raises(UnknownOperator):
            operators.payout(session, "alice", 1)  # an account, not an operator
    with herder.sessions() as session:
        found = operators.earnings(session, "acme")
        transfers = list(session.scalars(select(Transfer).where(Transfer.kind == "payout")))
    assert (found["earned"], found["paid_out"], found["balance"], found["jobs"]) == (earned, earned - 1, 1, 1)
    assert [(t.amount, t.job_id) for t in transfers] == [(earned - 1, None)]
    # A plain withdrawal from the operator's account leaves it to the world too: it is paid out.
    with herder.sessions.begin() as session:
        ledger.withdraw(session, ledger.account_by_name(session, "acme"), 1)
    with herder.sessions() as session:
        assert operators.earnings(session, "acme")["paid_out"] == earned
    herder.assert_books()


# --- heartbeats --------------------------------------------------------------------------------


def _beat(signer: signing.OperatorSigner, ts: float, worker: str = "acme/w1@host",
          interval_s: float = 2.0) -> dict[str, Any]:
    doc = {"worker": worker, "model": "smollm2", "slots": 4, "busy": 0, "ts": ts, "pid": 4242, "interval_s": interval_s}
    return json.loads(json.dumps(signer.attest_heartbeat(doc)))  # as read back from Redis


def test_a_heartbeat_is_attributed_only_while_fresh_and_genuine() -> None:
    acme, bolt = stub.operator_signer("acme"), stub.operator_signer("bolt")
    keys = {"acme": acme.key.public_key(), "bolt": bolt.key.public_key()}
    now = time.time()
    assert operators.verify_heartbeat(_beat(acme, now - 1), keys, now) == "acme"
    # Stale past three of its intervals, or past an explicit age; dated in the future.
    assert operators.verify_heartbeat(_beat(acme, now - 5.9), keys, now) == "acme"
    assert operators.verify_heartbeat(_beat(acme, now - 6.1), keys, now) is None
    assert operators.verify_heartbeat(_beat(acme, now - 1), keys, now, max_age_s=0.5) is None
    assert operators.verify_heartbeat(_beat(acme, now + 60), keys, now) is None
    assert operators.verify_heartbeat(_beat(acme, now, interval_s=0), keys, now) is None
    # Copied under another worker's name, or its time refreshed by hand.
    assert operators.verify_heartbeat(_beat(acme, now) | {"worker": "acme/w2@host"}, keys, now) is None
    # Signed by its own key, but naming another operator's worker, or a house worker.
    bolts = signing.OperatorSigner("bolt", bolt.key)
    assert operators.verify_heartbeat(_beat(bolts, now, worker="acme/w1@host"), keys, now) is None
    assert operators.verify_heartbeat(_beat(bolts, now, worker="w1@host"), keys, now) is None
    assert operators.verify_heartbeat(_beat(bolts, now, worker="bolt/w1@host"), keys, now) == "bolt"
    assert operators.verify_heartbeat(_beat(acme, now - 100) | {"ts": now}, keys, now) is None
    # Another operator's key, an unregistered operator, no attestation.
    assert operators.verify_heartbeat(_beat(signing.OperatorSigner("acme", bolt.key), now), keys, now) is None
    assert operators.verify_heartbeat(_beat(acme, now), {"bolt": keys["bolt"]}, now) is None
    unsigned = {k: v for k, v in _beat(acme, now).items() if k != signing.ATTESTATION}
    assert operators.verify_heartbeat(unsigned, keys, now) is None


# --- the whole service -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_stub_worker_run_for_an_operator_earns_through_the_whole_service(
        tmp_path: Path, redis_url: str, ledger_url: str) -> None:
    """Results reach settlement by the callback and by the tick's result-store path; both attribute."""
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, base_fee=1,
                              fee_per_token=1, operator_share=Decimal("0.8"))
    transport, clock = stub.StubTransport(), Clock()
    svc = stub.build(settings, transport=transport, slots=2, clock=clock)
    acme = stub.operator_signer("acme")
    with svc.sessions.begin() as session:
        _, api_key = ledger.create_account(session, "requester", DEPOSIT)
        operators.register(session, "acme", acme.key.public_key())
    worker = stub.scripted_worker(svc.public_key, svc.counter.models(), operator=acme, worker="acme-1@host")
    jobs = [svc.submit(api_key, Submission(prompt=f"Say hello {i}", max_tokens=8, multiplier=1.5))["job_id"]
            for i in range(4)]

    lost = transport.run_one(svc, worker, settle=False)  # its callback never comes: the tick settles it
    transport.join(svc, worker)
    clock.now += RECONCILE_AFTER_S + 1
    assert svc.tick()["settled"] == 1
    for task_id, stored in transport.stored.items():  # every result redelivered
        svc.on_result(task_id, stored.document or {})

    charges = [transport.responses[job]["charged"] for job in jobs]
    assert transport.stored[lost].document is not None
    with svc.sessions() as session:
        found = operators.earnings(session, "acme")
        assert ledger.check(session) == []
        attributed = set(session.scalars(select(JobRow.operator)))
    assert found["earned"] == found["balance"] == sum(c * 800_000 // PPM for c in charges)
    assert found["jobs"] == 4 and attributed == {"acme"}


# --- settings ------------------------------------------------------------------------------------


def test_the_operator_share_is_a_validated_fraction_kept_in_millionths(monkeypatch: pytest.MonkeyPatch) -> None:
    assert HerderSettings().operator_share_ppm == 800_000
    for given, ppm in (("0", 0), ("1", PPM), ("0.333333", 333_333), (0.8, 800_000), ("0.75", 750_000)):
        assert HerderSettings(operator_share=given).operator_share_ppm == ppm
    for bad in ("1.5", "-0.1", "0.1234567", "nan", "inf", "most"):
        with pytest.raises(ValidationError, match="operator_share"):
            HerderSettings(operator_share=bad)
    monkeypatch.setenv("LLAMAS_OPERATOR_SHARE", "0.65")
    assert HerderSettings().operator_share_ppm == 650_000
    assert type(HerderSettings().operator_share_ppm) is int


# --- the CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def cli(herder: Herder, ledger_url: str, tmp_path: Path, r: Any,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Invoke ``llamas operators …`` on the test ledger, with the herder's home in ``tmp_path``."""
    monkeypatch.setenv("LLAMAS_DATABASE_URL", ledger_url)
    monkeypatch.setenv("LLAMAS_HOME", str(tmp_path))
    get_settings.cache_clear()
    runner = CliRunner()
    before = set(r.execute_command("ACL", "USERS"))
    yield lambda *args: runner.invoke(operators_app, list(args))
    get_settings.cache_clear()
    # `operators add` made Redis users, which are the server's, not this test's database's.
    made = set(r.execute_command("ACL", "USERS")) - before
    if made:
        r.execute_command("ACL", "DELUSER", *made)


def _one_error(result: Any, text: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr, result.stderr


def test_cli_adds_lists_pays_out_and_refuses_in_one_line(
        cli: Callable[..., Any], herder: Herder, alice: str, tmp_path: Path) -> None:
    added = cli("add", "acme")
    assert added.exit_code == 0, added.output
    assert any(line.startswith("llm_") for line in added.stdout.splitlines()) and "only once" in added.stdout
    key_file = tmp_path / "operators" / "acme.key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and str(key_file) in added.stdout.replace("\n", "")
    acme = signing.load_operator("acme", key_file)
    assert acme is not None

    # bolt brings its own key, from a file; carol's account exists already, her key is given inline.
    bolt_key = Ed25519PrivateKey.generate()
    (tmp_path / "bolt.pub").write_text(signing.encode_public(bolt_key.public_key()) + "\n")
    assert cli("add", "bolt", "--public-key", str(tmp_path / "bolt.pub")).exit_code == 0
    herder.account("carol")
    carol = cli("add", "carol", "--public-key", signing.encode_public(Ed25519PrivateKey.generate().public_key()))
    assert carol.exit_code == 0 and "llm_" not in carol.stdout
    assert not (tmp_path / "operators" / "bolt.key").exists()

    # acme's worker, with the key the CLI wrote, serves a job.
    job = running(herder, alice, max_tokens=32, multiplier="1.5")
    row = settle(herder, herder.result(job.id, TEXT, signer=acme))
    assert row is not None and row.operator == "acme"
    earned = operators.share(row.charged or 0, herder.settings.operator_share_ppm)

    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    acme_line = next(line for line in listed.stdout.splitlines() if "acme" in line)
    assert signing.key_id(acme.key.public_key()) in acme_line and str(earned) in acme_line
    assert "bolt" in listed.stdout and "carol" in listed.stdout

    paid = cli("payout", "acme", str(earned - 3))
    assert paid.exit_code == 0 and "balance 3" in paid.stdout, paid.output
    shown = cli("earnings", "acme")
    assert shown.exit_code == 0
    assert f"earned {earned} on 1 jobs, paid out {earned - 3}, balance 3" in shown.stdout

    _one_error(cli("add", "acme"), "already registered")
    _one_error(cli("add", "dave", "--public-key", "not-a-key"), "invalid public key")
    _one_error(cli("add", "../evil"), "invalid account name")
    _one_error(cli("payout", "acme", "4"), "has 3, needs 4")
    _one_error(cli("payout", "acme", "0"), "positive integer")
    _one_error(cli("payout", "nobody", "1"), "no such operator: nobody")
    _one_error(cli("earnings", "alice"), "no such operator: alice")
    assert sorted(p.name for p in (tmp_path / "operators").iterdir()) == ["acme.key"]
    herder.assert_books()


def test_cli_never_overwrites_a_key_file(cli: Callable[..., Any], tmp_path: Path) -> None:
    key_file = tmp_path / "operators" / "acme.key"
    key_file.parent.mkdir()
    key_file.write_text("someone's key")
    _one_error(cli("add", "acme"), "exists")
    assert key_file.read_text() == "someone's key"
    listed = cli("list")
    assert listed.exit_code == 0 and "acme" not in listed.stdout  # nothing was registered


# --- the migration ------------------------------------------------------------------------------------


def test_migration_0005_adds_operators_and_keeps_every_transfer_and_constraint(ledger_url: str) -> None:
    upgrade(ledger_url, "0004")
    engine = make_engine(ledger_url)
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO accounts (name, kind, api_key_hash, webhook_secret, balance) "
                           "VALUES ('alice', 'user', 'h', 's', 60)"))
            ids = {name: id_ for name, id_ in c.execute(text("SELECT name, id FROM accounts"))}
            c.execute(text("UPDATE accounts SET balance = -100 WHERE name = 'world'"))
            c.execute(text("UPDATE accounts SET balance = 40 WHERE name = 'escrow'"))
            for debit, credit, amount, kind, job in (("world", "alice", 100, "deposit", None),
                                                     ("alice", "escrow", 40, "hold", "j1")):
                c.execute(text("INSERT INTO transfers (debit_account_id, credit_account_id, amount, kind, job_id) "
                               "VALUES (:d, :c, :a, :k, :j)"),
                          dict(d=ids[debit], c=ids[credit], a=amount, k=kind, j=job))
            before = c.execute(text("SELECT id, debit_account_id, credit_account_id, amount, kind, job_id "
                                    "FROM transfers ORDER BY id")).all()

        upgrade(ledger_url)

        with engine.connect() as c:
            assert c.execute(text("SELECT id, debit_account_id, credit_account_id, amount, kind, job_id "
                                  "FROM transfers ORDER BY id")).all() == before
            assert "operators" in inspect(c).get_table_names()
            assert "operator" in {col["name"] for col in inspect(c).get_columns("jobs")}
        insert = text("INSERT INTO transfers (debit_account_id, credit_account_id, amount, kind, job_id) "
                      "VALUES (:d, :c, :a, :k, 'j1')")
        with engine.begin() as c:
            c.execute(insert, dict(d=ids["escrow"], c=ids["alice"], a=30, k="earn"))
        # Each of the table's other checks survived the copy SQLite's batch mode makes.
        for d, cr, a, k in ((ids["escrow"], ids["alice"], 1, "bogus"), (ids["escrow"], ids["alice"], 0, "earn"),
                            (ids["alice"], ids["alice"], 1, "payout")):
            with pytest.raises(IntegrityError), engine.begin() as c:
                c.execute(insert, dict(d=d, c=cr, a=a, k=k))

        # Going back is refused while an earn exists, and works once none does.
        with pytest.raises(IntegrityError):
            command.downgrade(alembic_config(ledger_url), "0004")
        with engine.begin() as c:
            c.execute(text("DELETE FROM transfers WHERE kind = 'earn'"))
        command.downgrade(alembic_config(ledger_url), "0004")
        with engine.connect() as c:
            assert "operators" not in inspect(c).get_table_names()
            assert c.execute(text("SELECT count(*) FROM transfers")).scalar() == 2
        upgrade(ledger_url)
    finally:
        engine.dispose()


# --- a real worker --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_started_for_an_operator_signs_its_heartbeat_and_result_and_the_operator_earns(
        start_worker: Any, celery_app: Any, r: Any, redis_url: str, private_key: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "acme.key"
    signing.write_private(key_file, Ed25519PrivateKey.generate())
    acme = signing.load_operator("acme", key_file)
    assert acme is not None
    keys = {"acme": acme.key.public_key()}

    refused = start_worker(wait=False, LLAMAS_OPERATOR="acme", LLAMAS_OPERATOR_KEY=str(tmp_path / "none.key"))
    assert refused.proc.wait(timeout=60) == 2
    [line] = [line for line in refused.output().splitlines() if "refuses to start" in line]
    assert "LLAMAS_OPERATOR='acme'" in line and "none.key" in line and "Traceback" not in refused.output()

    worker = start_worker(concurrency=1, LLAMAS_OPERATOR="acme", LLAMAS_OPERATOR_KEY=str(key_file))
    beat = worker.wait_ready(r)
    assert beat["operator"] == "acme" and operators.verify_heartbeat(beat, keys, time.time()) == "acme"

    # The herder's own code, sending to the real worker through Celery with the task id it chose.
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    transport = stub.StubTransport()
    svc = stub.build(settings, transport=transport, key=private_key, herd=stub.StaticHerd(["smollm2"], 1))
    with svc.sessions.begin() as session:
        _, api_key = ledger.create_account(session, "requester", DEPOSIT)
        operators.register(session, "acme", acme.key.public_key())
    job = svc.submit(api_key, Submission(prompt="Name one animal.", max_tokens=6, temperature=0.0))["job_id"]

    def over_celery(envelope: dict[str, Any], task_id: str) -> dict[str, Any]:
        return celery_app.send_task(GENERATE_TASK, args=[envelope], queue="llama.smollm2",
                                    task_id=task_id).get(timeout=120)

    assert transport.join(svc, over_celery) == 1

    [(task_id, stored)] = transport.stored.items()
    streamed = [json.loads(fields[b"doc"]) for _, fields in r.xrange(RESULTS_STREAM)]
    [from_stream] = [doc for doc in streamed if doc.get("task_id") == task_id]
    assert from_stream == stored.document  # one document, one attestation, on both paths
    assert from_stream["operator"] == "acme"
    # The claim in Redis is the worker's, signed with acme's key: the herder checked it against the result.
    [claim] = claims.holders(r, [(job, 1)])
    with svc.sessions() as session:
        row = session.scalar(select(JobRow).where(JobRow.id == job))
        assert provenance.claim_holder(session, svc.provenance, claim, row) == signing.key_id(acme.key.public_key())
    response = transport.responses[job]
    assert response["status"] == "done" and response["worker"] == worker.worker
    with svc.sessions() as session:
        found = operators.earnings(session, "acme")
        assert ledger.check(session) == []
        assert session.scalar(select(JobRow.operator).where(JobRow.id == job)) == "acme"
        # The model id the real worker verified its file against, kept for the receipt.
        model_id = session.scalar(select(JobRow.model_id).where(JobRow.id == job))
        assert model_id == from_stream["model_id"] == svc.counter.models()["smollm2"].model_id
    assert found["earned"] == operators.share(response["charged"], settings.operator_share_ppm) and found["jobs"] == 1
