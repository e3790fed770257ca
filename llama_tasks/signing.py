"""Ed25519 work envelopes: the herder signs, workers verify.

An envelope is ``{"payload": {...}, "key_id": str, "sig": base64}``. The
signature covers the payload's canonical JSON (sorted keys, no spaces), so any
change to a field — prompt, max tokens, expiry — breaks it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from llama_tasks.errors import BadSignature, MissingPublicKey, Unsigned, UnknownSigner


def canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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


def generate_keypair(home: Path) -> tuple[Path, Path]:
    """Write a new key pair as ``herder.key`` (PEM, mode 0600) and ``herder.pub`` (base64)."""
    home.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    key_file, pub_file = home / "herder.key", home / "herder.pub"
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_file.write_text(encode_public(private_key.public_key()) + "\n")
    return key_file, pub_file


def ensure_keypair(home: Path) -> Path:
    """Create the herder's key pair on first use; return the public key file."""
    if not (home / "herder.key").exists():
        generate_keypair(home)
    return home / "herder.pub"


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
