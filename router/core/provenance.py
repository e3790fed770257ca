"""Provenance: whether a result was produced by the worker that took its attempt, and whose worker that is.

Anyone who can write to Redis can post a result document, so the herder
settles one only when all of this holds (``check``):

- its attestation is signed by the house's key or a registered operator's,
  over the sha256 of the document as sent (task, job, attempt, worker, model
  id and every choice's generated-token count included);
- it proves receipt of the attempt: an HMAC of that sha256 under the
  attempt's secret, which only the signed envelope carried
  (``llama_tasks.signing.attempt_secret``), so a worker that never received
  the attempt cannot report it, whatever it copied from a stream;
- the worker it names is the signer's (``<operator>/<hostname>`` for an
  operator, a name without ``/`` for the house);
- no other signer holds the attempt's claim: the first signed claim of an
  attempt (``llama_tasks.claims``) says whose result counts. A claim that does
  not verify is no one's and decides nothing; a missing one (expired, or
  Redis lost it) leaves the proof of receipt to decide.

A result refused here is never settled: the attempt's lease runs out and the
job runs again, so nothing is charged or earned for it.

Plain functions over the caller's session; none commits.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from llama_tasks import signing
from llama_tasks.errors import Rejected
from router.core import operators
from router.core.models import JobRow, Operator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keys:
    """What results are checked against: the herder's key (each attempt's secret) and the house's public key."""

    herder: Ed25519PrivateKey
    #: None: no house worker's result is accepted (only operators' are).
    house: Ed25519PublicKey | None


@dataclass(frozen=True)
class Provenance:
    """Whether a result is accepted, the operator it pays (None: the house), and why, as a short fixed phrase."""

    accepted: bool
    operator: Operator | None
    reason: str


def _refused(reason: str) -> Provenance:
    return Provenance(False, None, reason)


def _signer(session: Session, keys: Keys, name: Any) -> tuple[Ed25519PublicKey | None, Operator | None]:
    """The public key (and operator row) that ``name`` signs with: None or "" is the house."""
    if name is None or name == "":
        return keys.house, None
    if not isinstance(name, str):
        return None, None
    operator = session.scalar(select(Operator).where(Operator.name == name))
    return (signing.decode_public(operator.public_key), operator) if operator is not None else (None, None)


def _verified(envelope: Any, key: Ed25519PublicKey | None) -> dict[str, Any] | None:
    if key is None:
        return None
    try:
        return signing.verify(envelope, key)
    except Rejected:
        return None


def claim_holder(session: Session, keys: Keys, claim: dict[str, Any] | None, row: JobRow) -> str | None:
    """The key id that signed the claim holding ``row``'s attempt, or None when no claim verifies."""
    envelope = claim.get(signing.CLAIM_SIGNATURE) if isinstance(claim, dict) else None
    payload = envelope.get("payload") if isinstance(envelope, dict) else None
    if not isinstance(payload, dict) or payload.get("job_id") != row.id or payload.get("attempt") != row.attempt:
        return None
    key, _ = _signer(session, keys, payload.get("operator"))
    if _verified(envelope, key) is None:
        return None
    assert key is not None
    return signing.key_id(key)


def check(session: Session, keys: Keys, doc: dict[str, Any], row: JobRow, claim: dict[str, Any] | None) -> Provenance:
    """Whether ``doc`` (as the worker sent it) reports ``row``'s current attempt, and for whom."""
    attestation = doc.get(signing.ATTESTATION)
    payload = attestation.get("payload") if isinstance(attestation, dict) else None
    if not isinstance(payload, dict):
        return _refused("unsigned")
    name = payload.get("operator")
    key, operator = _signer(session, keys, name)
    if key is None:
        return _refused("not signed by the house or a registered operator")
    if _verified(attestation, key) is None:
        return _refused("signature does not verify")
    try:
        content = signing.content_sha256(doc)
    except (TypeError, ValueError):  # not JSON: it cannot be what the worker signed
        return _refused("content cannot be hashed")
    if payload.get("result_sha256") != content or doc.get("operator", "") != (name or ""):
        return _refused("content changed after signing")
    secret = signing.attempt_secret(keys.herder, row.id, row.attempt)
    proof = payload.get("proof")
    if not isinstance(proof, str) or not hmac.compare_digest(proof, signing.receipt_proof(secret, content)):
        return _refused("no proof of receiving the attempt")
    worker = doc.get("worker")
    if operator is not None and not operators.named_for(worker, operator.name):
        return _refused("names a worker that is not the operator's")
    if operator is None and (not isinstance(worker, str) or "/" in worker):
        return _refused("names a worker that is not the house's")
    holder = claim_holder(session, keys, claim, row)
    if holder is not None and holder != signing.key_id(key):
        return _refused("another worker holds the attempt's claim")
    return Provenance(True, operator, "verified")
