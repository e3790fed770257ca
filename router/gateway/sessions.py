"""The dashboard's sessions: a random id in the cookie, who signed in kept in Redis until it expires.

The cookie never holds a key. Redis holds, under the sha256 of the session
id, who the session is: the admin (with the sha256 of the admin key then in
force) or an account (by its key's sha256, as the ledger stores it). Every
use looks that up again, so a rotated key, a changed admin key, signing out
or ``LLAMAS_DASHBOARD_SESSION_S`` passing each ends the session at once.
"""

from __future__ import annotations

import hashlib
import secrets

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from router.core import ledger
from router.core.errors import UnknownAccount
from router.core.keys import DASHBOARD_SESSION_PREFIX
from router.core.models import Account
from router.core.service import HerderService
from router.gateway.deps import is_admin_key

#: Who a session is, as stored: ``ADMIN + sha256(admin key)`` or ``ACCOUNT + the key's sha256``.
ADMIN = "admin:"
ACCOUNT = "account:"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def identify(session: Session, svc: HerderService, key: str) -> tuple[str, Account | None]:
    """``(who, account)`` for a key signing in (account None for the admin); ``UnknownAccount`` otherwise."""
    if is_admin_key(svc, key):
        return ADMIN + _sha256(key), None
    account = ledger.account_by_key(session, key)
    return ACCOUNT + ledger.hash_api_key(key), account


def account_of(session: Session, svc: HerderService, who: str) -> Account | None:
    """The account ``who`` still is (None: still the admin); ``UnknownAccount`` if its key changed since."""
    if who.startswith(ADMIN):
        admin_key = svc.settings.admin_key
        if admin_key and secrets.compare_digest(who, ADMIN + _sha256(admin_key)):
            return None
    elif who.startswith(ACCOUNT):
        account = session.scalar(select(Account).where(Account.api_key_hash == who.removeprefix(ACCOUNT)))
        if account is not None:
            return account
    raise UnknownAccount("(the key this dashboard session signed in with)")


def stream_owner(who: str) -> str:
    """The key whose stream share a dashboard stream counts against (as ``streams.claim`` names it)."""
    return "admin" if who.startswith(ADMIN) else who.removeprefix(ACCOUNT)


# Sessions use the service's own (blocking) Redis client, from the thread pool as the snapshots do:
# one client for every event loop a process runs.

def open_session(r: redis.Redis, who: str, ttl_s: int) -> str:
    """A new session id for ``who``, valid ``ttl_s`` seconds."""
    session_id = secrets.token_urlsafe(32)
    r.set(DASHBOARD_SESSION_PREFIX + _sha256(session_id), who, ex=ttl_s)
    return session_id


def who_is(r: redis.Redis, session_id: str | None) -> str:
    """Who the session ``session_id`` signed in as; ``UnknownAccount`` (401) if none, expired or signed out."""
    raw = r.get(DASHBOARD_SESSION_PREFIX + _sha256(session_id)) if session_id else None
    if raw is None:
        raise UnknownAccount("(not signed in to the dashboard)")
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def close_session(r: redis.Redis, session_id: str | None) -> None:
    if session_id:
        r.delete(DASHBOARD_SESSION_PREFIX + _sha256(session_id))
