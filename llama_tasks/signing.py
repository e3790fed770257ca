"""Ed25519 envelopes: the herder signs work for workers; workers sign what they report.

An envelope is ``{"payload": {...}, "key_id": str, "sig": base64}``. The
signature covers the payload's canonical JSON (sorted keys, no spaces), so any
change to a field — prompt, max tokens, expiry — breaks it.

Every worker signs what it reports with the key of whoever runs it: an
operator's key (``LLAMAS_OPERATOR``), or the house's (``<home>/house.key``)
for the house's own workers. Each result carries an *attestation*: the sha256
of the whole document (task, job, attempt, worker, model id and every
choice's generated-token count included) and a *proof of receipt* — an HMAC
of that sha256 under the attempt's secret, which only the signed envelope
carried, so only a worker that received the attempt can report it. Each
claim of an attempt and each heartbeat is signed the same way. The herder
pays for a result only when all of it verifies (``router.core.provenance``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from llama_tasks.errors import BadSignature, MissingHouseKey, MissingOperatorKey, MissingPublicKey, UnknownSigner, Unsigned

#: The field of a result or heartbeat document that holds its operator's signed attestation.
ATTESTATION = "attestation"
#: Fields of a heartbeat an attestation names.
HEARTBEAT_CLAIMS = ("worker", "pid", "operator", "ts", "interval_s")
#: The field of a claim document that holds its signature (an envelope over the claim's other fields).
CLAIM_SIGNATURE = "signed"


def canonical(payload: dict[str, Any]) -> bytes:
    # surrogatepass: a lone surrogate in generated text must hash, not crash.
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )


def content_sha256(doc: dict[str, Any]) -> str:
    """sha256 hex of a document's canonical JSON without its attestation.

    Identical after a JSON round trip (the results stream, Celery's result
    store), so the herder recomputes exactly what the worker signed.
    """
    return hashlib.sha256(canonical({k: v for k, v in doc.items() if k != ATTESTATION})).hexdigest()


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint that names a key in logs and envelopes."""
    return hashlib.sha256(public_bytes(key)).hexdigest()[:16]


def encode_public(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_bytes(key)).decode()


def decode_public(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip()))


def sign(payload: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Wrap ``payload`` in an envelope signed by ``private_key``."""
    return {
        "payload": payload,
        "key_id": key_id(private_key.public_key()),
        "sig": base64.b64encode(private_key.sign(canonical(payload))).decode(),
    }


def verify(envelope: Any, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Return the payload of an envelope that ``public_key`` signed, or raise."""
    if (
        not isinstance(envelope, dict)
        or not isinstance(envelope.get("payload"), dict)
        or not envelope.get("sig")
    ):
        raise Unsigned()
    expected = key_id(public_key)
    if envelope.get("key_id") != expected:
        raise UnknownSigner(str(envelope.get("key_id")), expected)
    try:
        public_key.verify(base64.b64decode(envelope["sig"]), canonical(envelope["payload"]))
    except (InvalidSignature, ValueError, TypeError):
        raise BadSignature() from None
    return envelope["payload"]


def write_private(key_file: Path, private_key: Ed25519PrivateKey, *, replace: bool = True) -> None:
    """Write ``private_key`` as PEM, readable by its owner only (mode 0600).

    With ``replace=False`` an existing file is never overwritten (``FileExistsError``).
    """
    key_file.parent.mkdir(parents=True, exist_ok=True)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(key_file, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def generate_keypair(home: Path, name: str = "herder") -> tuple[Path, Path]:
    """Write a new key pair as ``<name>.key`` (PEM, mode 0600) and ``<name>.pub`` (base64).

    ``herder`` signs work for workers; ``house`` signs what the house's own workers report.
    """
    home.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    key_file, pub_file = home / f"{name}.key", home / f"{name}.pub"
    write_private(key_file, private_key)
    pub_file.write_text(encode_public(private_key.public_key()) + "\n")
    return key_file, pub_file


def attempt_secret(herder_key: Ed25519PrivateKey, job_id: str, attempt: int) -> str:
    """The secret of one attempt: carried in its signed envelope, derived again by any herder."""
    message = f"attempt:{job_id}:{attempt}".encode()
    return hmac.new(herder_key.private_bytes_raw(), message, hashlib.sha256).hexdigest()


def receipt_proof(secret: str, result_sha256: str) -> str:
    """Proof that whoever reports ``result_sha256`` received the attempt whose ``secret`` it is."""
    return hmac.new(secret.encode(), result_sha256.encode(), hashlib.sha256).hexdigest()


def load_private(key_file: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{key_file} is not an Ed25519 private key")
    return key


def load_public(configured: str, pub_file: Path) -> Ed25519PublicKey:
    """The herder's public key from configuration, else from ``pub_file``."""
    if configured:
        return decode_public(configured)
    if not pub_file.exists():
        raise MissingPublicKey(str(pub_file))
    return decode_public(pub_file.read_text())


# --- what a worker attests ---------------------------------------------------------


@dataclass(frozen=True)
class OperatorSigner:
    """Whoever runs a worker, with its private key: an operator by name, or the house (name ``""``)."""

    name: str
    key: Ed25519PrivateKey

    @property
    def operator(self) -> str | None:
        return self.name or None

    def _named(self, doc: dict[str, Any]) -> dict[str, Any]:
        named = {k: v for k, v in doc.items() if k not in (ATTESTATION, "operator")}
        return named | {"operator": self.name} if self.name else named

    def attest_result(self, doc: dict[str, Any], secret: str) -> dict[str, Any]:
        """``doc`` naming its operator, with an attestation of who produced it and that it received the attempt.

        The signed payload is the operator, the sha256 of the whole document
        (``content_sha256``: its task, job, attempt, worker, model id and token
        counts), and the proof of receipt under the attempt's ``secret``.
        """
        named = self._named(doc)
        digest = content_sha256(named)
        return named | {ATTESTATION: sign({"operator": self.operator, "result_sha256": digest,
                                           "proof": receipt_proof(secret, digest)}, self.key)}

    def attest_heartbeat(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A heartbeat naming this operator, with an attestation of its worker, process and time."""
        named = self._named(doc)
        return named | {ATTESTATION: sign({field: named.get(field) for field in HEARTBEAT_CLAIMS}, self.key)}

    def sign_claim(self, claim: dict[str, Any]) -> dict[str, Any]:
        """A claim of an attempt, signed: the herder pays only the worker whose claim holds the attempt."""
        fields = {k: v for k, v in claim.items() if k != CLAIM_SIGNATURE} | {"operator": self.operator}
        return fields | {CLAIM_SIGNATURE: sign(fields, self.key)}


def load_operator(name: str, key_file: Path) -> OperatorSigner:
    """The signer of operator ``name`` (``""``: the house) from its PEM key file.

    Raises ``MissingOperatorKey`` when the file cannot be read as an Ed25519 key.
    """
    try:
        return OperatorSigner(name, load_private(key_file))
    except FileNotFoundError:
        reason = "no such file"
    except PermissionError:
        reason = "permission denied"
    except IsADirectoryError:
        reason = "it is a directory"
    except (TypeError, ValueError):
        # Never the parser's message: it may quote the file's bytes.
        reason = "not an Ed25519 private key in PEM"
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    if not name:
        raise MissingHouseKey(str(key_file), reason)
    raise MissingOperatorKey(name, str(key_file), reason)
