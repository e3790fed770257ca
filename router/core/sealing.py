"""Secrets the herder must read back but a copy of the ledger file must not reveal.

A webhook secret signs every delivery, so unlike an API key it cannot be
kept as a hash. It is sealed with AES-256-GCM under a key kept outside the
database: ``LLAMAS_SECRETS_KEY``, or the file ``<home>/secrets.key`` (mode
0600, made on first use). Whoever copies ``ledger.db`` (or dumps the
PostgreSQL table) gets ciphertext; whoever also holds the key file can read
it, as whoever holds ``herder.key`` can sign. Every herder and gateway of one
ledger needs the same key, as it needs the same signing key.

``SealedText`` is the column type: the ORM seals on write and opens on read,
so the rest of the code handles the secret as text.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from router.core import private_files
from router.core.errors import SecretUnreadable
from router.core.settings import get_settings

log = logging.getLogger(__name__)

#: Marks a sealed value, and which scheme sealed it (base64url of nonce + ciphertext + tag follows).
PREFIX = "aesgcm1:"
#: The key file's name in the home.
KEY_FILE = "secrets.key"
KEY_BYTES = 32
NONCE_BYTES = 12
#: Characters a sealed 64-character secret takes (the column's width leaves room to spare).
SEALED_CHARS = 200


class SecretBox:
    """Seals and opens text with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secrets key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plaintext.encode(), PREFIX.encode())
        return PREFIX + base64.urlsafe_b64encode(sealed).decode()

    def open(self, sealed: str) -> str:
        """The text ``seal`` sealed; ``SecretUnreadable`` for anything else, or for another key's seal."""
        if not is_sealed(sealed):
            raise SecretUnreadable("it is not sealed")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(PREFIX):])
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], PREFIX.encode())
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretUnreadable("it was sealed with another key, or altered") from None
        return plain.decode()


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def parse_key(text: str) -> bytes:
    """A key written as base64 (standard or URL-safe); ``ValueError`` unless it is 32 bytes."""
    try:
        key = base64.urlsafe_b64decode(text.strip().replace("+", "-").replace("/", "_"))
    except (binascii.Error, ValueError):
        raise ValueError("a secrets key must be base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"a secrets key is {KEY_BYTES} bytes in base64, not {len(key)}")
    return key


def load_key(home: Path, given: str = "") -> bytes:
    """The key ``given`` (base64), or the one in ``<home>/secrets.key``, made (0600) when there is none."""
    if given:
        return parse_key(given)
    path = home / KEY_FILE
    private_files.private_dir(home)
    if private_files.create_private(path):
        # Made empty first, with O_EXCL: of two processes starting at once, one writes the key.
        private_files.write_private(path, base64.urlsafe_b64encode(os.urandom(KEY_BYTES)) + b"\n")
        # Said aloud: a herder on another host needs this same key, or the secrets it seals are lost to it.
        log.warning("made a new secrets key in %s: every herder and gateway of this ledger needs the same key "
                    "(copy the file, or set LLAMAS_SECRETS_KEY)", path)
    text = path.read_text()
    if not text.strip():  # the other process is writing it right now
        text = _reread(path)
    return parse_key(text)


def _reread(path: Path, tries: int = 50) -> str:
    for _ in range(tries):
        time.sleep(0.01)
        text = path.read_text()
        if text.strip():
            return text
    raise ValueError(f"{path} is empty: delete it to make a new key (secrets sealed with the old one are lost)")


@lru_cache(maxsize=8)
def box_for(home: Path, given: str = "") -> SecretBox:
    """The box of this home's key (or of the key given), loaded once per process."""
    return SecretBox(load_key(home, given))


def default_box() -> SecretBox:
    """The box of this process's settings (``LLAMAS_SECRETS_KEY`` or the home's key file)."""
    settings = get_settings()
    return box_for(settings.home, settings.secrets_key)


class SealedText(TypeDecorator[str]):
    """A text column stored sealed (``default_box``): plain text in Python, ciphertext in the database.

    Give it ``deferred=True`` so that loading the row does not open the seal:
    only code that reads the column needs the key.
    """

    impl = String(SEALED_CHARS)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else default_box().seal(str(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else default_box().open(str(value))
