"""A worker run for an operator: its settings, its key, and the attestations it signs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from llama_tasks import runtime, signing
from llama_tasks.errors import MissingHouseKey, MissingOperatorKey
from llama_tasks.settings import WorkerSettings


def _result() -> dict[str, object]:
    return {"task_id": "t-1", "job_id": "j-1", "attempt": 2, "worker": "w@host", "text": "héllo \ud800",
            "timings": {"prompt_s": 0.25}, "choices": [{"index": 0, "text": "héllo"}]}


def test_a_result_attestation_names_the_attempt_and_the_content_and_survives_json() -> None:
    key, herder = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    secret = signing.attempt_secret(herder, "j-1", 2)
    doc = signing.OperatorSigner("acme", key).attest_result(_result(), secret)
    assert doc["operator"] == "acme"
    # What the stream and the result store carry back (a lone surrogate included).
    doc = json.loads(json.dumps(doc))
    payload = signing.verify(doc[signing.ATTESTATION], key.public_key())
    digest = signing.content_sha256(doc)
    # The proof of receipt: only a holder of the attempt's secret (the envelope's receiver) makes it.
    assert payload == {"operator": "acme", "result_sha256": digest, "proof": signing.receipt_proof(secret, digest)}
    assert signing.receipt_proof(signing.attempt_secret(herder, "j-1", 3), digest) != payload["proof"]
    assert signing.attempt_secret(Ed25519PrivateKey.generate(), "j-1", 2) != secret
    # The hash covers the whole document: which attempt it was made for as well as its text.
    for field, value in (("text", "changed"), ("task_id", "t-2"), ("job_id", "j-2"), ("attempt", 3),
                         ("worker", "elsewhere@host"), ("operator", "bolt")):
        assert signing.content_sha256(doc | {field: value}) != payload["result_sha256"], field
    # Signing again replaces the attestation rather than covering it.
    again = signing.OperatorSigner("acme", key).attest_result(doc, secret)
    assert again[signing.ATTESTATION]["payload"] == payload


def test_the_house_signs_without_naming_an_operator_and_claims_are_signed_too() -> None:
    key = Ed25519PrivateKey.generate()
    house = signing.OperatorSigner("", key)
    doc = house.attest_result(_result() | {"operator": "acme"}, "secret")
    assert "operator" not in doc  # a house document names no operator, whatever it said before
    assert signing.verify(doc[signing.ATTESTATION], key.public_key())["operator"] is None
    claim = house.sign_claim({"job_id": "j-1", "attempt": 2, "message": "t-1", "state": "running"})
    payload = signing.verify(claim[signing.CLAIM_SIGNATURE], key.public_key())
    assert payload == {"job_id": "j-1", "attempt": 2, "message": "t-1", "state": "running", "operator": None}


def test_a_heartbeat_attestation_names_the_worker_process_operator_and_time() -> None:
    key = Ed25519PrivateKey.generate()
    beat = {"worker": "w@host", "pid": 7, "ts": 1_700_000_000.5, "interval_s": 2.0, "slots": 4}
    doc = signing.OperatorSigner("acme", key).attest_heartbeat(beat)
    assert signing.verify(doc[signing.ATTESTATION], key.public_key()) == {
        "worker": "w@host", "pid": 7, "operator": "acme", "ts": 1_700_000_000.5, "interval_s": 2.0}


def test_an_operator_key_is_loaded_or_refused_with_its_reason(tmp_path: Path) -> None:
    with pytest.raises(MissingHouseKey, match="absent.key"):  # the house's worker needs the house's key
        signing.load_operator("", tmp_path / "absent.key")
    key_file = tmp_path / "acme.key"
    signing.write_private(key_file, Ed25519PrivateKey.generate())
    assert key_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        signing.write_private(key_file, Ed25519PrivateKey.generate(), replace=False)
    loaded = signing.load_operator("acme", key_file)
    assert loaded is not None and loaded.name == "acme"

    (tmp_path / "garbage.key").write_text("-----BEGIN PRIVATE KEY-----\nsecret bytes\n-----END PRIVATE KEY-----\n")
    for path, reason in ((tmp_path / "absent.key", "no such file"), (tmp_path, "directory"),
                         (tmp_path / "garbage.key", "not an Ed25519 private key")):
        with pytest.raises(MissingOperatorKey) as refused:
            signing.load_operator("acme", path)
        message = str(refused.value)
        assert reason in message and str(path) in message and "LLAMAS_OPERATOR='acme'" in message
        assert "\n" not in message and "secret" not in message


def test_worker_settings_name_the_operator_and_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings(home=tmp_path).operator == ""
    assert WorkerSettings(home=tmp_path).signer_key_path == tmp_path / "house.key"
    assert WorkerSettings(home=tmp_path, house_key_file=tmp_path / "h").signer_key_path == tmp_path / "h"
    settings = WorkerSettings(home=tmp_path, operator="acme")
    assert settings.operator_key_path == settings.signer_key_path == tmp_path / "operators" / "acme.key"
    assert settings.worker_name("llama@gpu1") == "acme/llama@gpu1"
    assert WorkerSettings(home=tmp_path).worker_name("llama@gpu1") == "llama@gpu1"
    assert WorkerSettings(home=tmp_path, operator="acme", operator_key_file=tmp_path / "k").operator_key_path == \
        tmp_path / "k"
    monkeypatch.setenv("LLAMAS_OPERATOR", "bolt")
    monkeypatch.setenv("LLAMAS_OPERATOR_KEY", str(tmp_path / "bolt.pem"))
    from_env = WorkerSettings(home=tmp_path)
    assert (from_env.operator, from_env.operator_key_path) == ("bolt", tmp_path / "bolt.pem")
    for bad in ("../evil", "a b", ".hidden", "x" * 101):
        with pytest.raises(ValidationError, match="not an operator name"):
            WorkerSettings(home=tmp_path, operator=bad)


def test_a_worker_for_an_operator_without_its_key_refuses_to_start(tmp_path: Path, home: Path) -> None:
    settings = WorkerSettings(home=home, operator="acme", operator_key_file=tmp_path / "absent.key")
    with pytest.raises(MissingOperatorKey, match="absent.key"):
        runtime.check_startup(settings)
