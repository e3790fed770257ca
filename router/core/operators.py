"""Operators: who runs workers, how their results are attributed, and what they earned.

An operator is an ordinary requester account plus an Ed25519 public key. A
worker run for an operator signs an attestation into every result, claim and
heartbeat it publishes (``llama_tasks.signing.OperatorSigner``); at
settlement the herder pays the operator only for a result whose provenance
verifies against the key registered here (``router.core.provenance``), and
the dashboard attributes a worker to it only by a fresh signed heartbeat
naming one of its workers.

Plain functions over the caller's session; none commits.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from llama_tasks import signing
from llama_tasks.constants import HEARTBEAT_TTL_INTERVALS
from llama_tasks.errors import Rejected
from llama_tasks.settings import OPERATOR_NAME
from router.core import fees, ledger
from router.core.errors import (
    AccountExists,
    InvalidAccountName,
    InvalidPublicKey,
    OperatorExists,
    UnknownOperator,
)
from router.core.models import Account, JobRow, Operator, Transfer

log = logging.getLogger(__name__)

#: Longest heartbeat interval a worker may declare (``SharedSettings.heartbeat_interval_s``'s bound).
MAX_HEARTBEAT_INTERVAL_S = 60.0
#: How far ahead of the reader's clock a heartbeat's time may be (clocks of two hosts differ).
CLOCK_SKEW_S = 10.0

#: Operators' public keys by name, as ``public_keys`` returns them.
Keys = Mapping[str, Ed25519PublicKey]


# --- registering ------------------------------------------------------------------


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from raw base64 (as ``herder.pub``) or PEM."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise InvalidPublicKey("the PEM key is not an Ed25519 key")
            return key
        raw = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error, TypeError):
        raise InvalidPublicKey("neither base64 nor a PEM public key") from None
    if len(raw) != 32:
        raise InvalidPublicKey(f"an Ed25519 public key is 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def register(session: Session, name: str, public_key: str | Ed25519PublicKey) -> tuple[Operator, str | None]:
    """Register operator ``name`` with its public key; its account ``name`` is opened if missing.

    Returns the operator and the API key of the account when it was opened
    here (shown once, as ``ledger.create_account`` does), else None.
    """
    if not OPERATOR_NAME.fullmatch(name):
        raise InvalidAccountName(name, "an operator's name is letters, digits, '.', '_' and '-', "
                                       "starting with a letter or digit, at most 100 characters")
    key = parse_public_key(public_key) if isinstance(public_key, str) else public_key
    api_key: str | None = None
    try:
        account, api_key = ledger.create_account(session, name)
    except AccountExists:
        account = ledger.account_by_name(session, name)
        if account.kind != "user":
            raise InvalidAccountName(name, "it is a system account") from None
    operator = Operator(name=name, account_id=account.id, public_key=signing.encode_public(key))
    try:
        # A savepoint: a concurrent registration of the same name leaves the caller's transaction usable.
        with session.begin_nested():
            session.add(operator)
    except IntegrityError:
        raise OperatorExists(name) from None
    return operator, api_key


def public_keys(session: Session) -> dict[str, Ed25519PublicKey]:
    """Every registered operator's public key, by name."""
    rows = session.execute(select(Operator.name, Operator.public_key))
    return {name: signing.decode_public(key) for name, key in rows}


def operator_by_name(session: Session, name: str) -> Operator:
    operator = session.scalar(select(Operator).where(Operator.name == name))
    if operator is None:
        raise UnknownOperator(name)
    return operator


# --- attribution --------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    """Whom a signed document is attributed to (None: nobody) and why, as a short fixed phrase."""

    operator: str | None
    reason: str


def _attested(doc: Any, keys: Keys, claims: tuple[str, ...]) -> Attribution:
    """Check ``doc``'s attestation: a registered operator's signature over ``claims`` as the doc states them."""
    if not isinstance(doc, dict):
        return Attribution(None, "not a document")
    attestation = doc.get(signing.ATTESTATION)
    if attestation is None:
        return Attribution(None, "unsigned")
    payload = attestation.get("payload") if isinstance(attestation, dict) else None
    name = payload.get("operator") if isinstance(payload, dict) else None
    key = keys.get(name) if isinstance(name, str) else None
    if key is None:
        return Attribution(None, "unregistered operator")
    try:
        signing.verify(attestation, key)
    except Rejected:
        return Attribution(None, "signature does not verify")
    assert isinstance(payload, dict)
    if any(_strict(payload.get(claim)) != _strict(doc.get(claim)) for claim in claims):
        return Attribution(None, "attestation names another attempt")
    return Attribution(name, "verified")


def _strict(value: Any) -> tuple[type, Any]:
    # 1 == True == 1.0 in Python; a signed claim must match in type too.
    return type(value), value


def verify_heartbeat(doc: dict[str, Any], keys: Keys, now: float, max_age_s: float | None = None) -> str | None:
    """The operator whose worker sent a heartbeat, or None when unsigned, forged or stale.

    A beat is stale once older than ``max_age_s`` (default: as many of its own
    signed intervals as Redis keeps a heartbeat), or dated more than
    ``CLOCK_SKEW_S`` ahead of ``now`` (Unix seconds).
    """
    found = _attested(doc, keys, signing.HEARTBEAT_CLAIMS)
    if found.operator is None or not named_for(doc.get("worker"), found.operator):
        return None
    ts, interval_s = _number(doc.get("ts")), _number(doc.get("interval_s"))
    if ts is None or interval_s is None or not 0 < interval_s <= MAX_HEARTBEAT_INTERVAL_S:
        return None
    oldest = now - (HEARTBEAT_TTL_INTERVALS * interval_s if max_age_s is None else max_age_s)
    return found.operator if oldest <= ts <= now + CLOCK_SKEW_S else None


def named_for(worker: Any, operator: str) -> bool:
    """Whether a worker name is one of ``operator``'s (``<operator>/<hostname>``: ``WorkerSettings.worker_name``).

    A signature binds a beat to its operator; the name binds the worker to it
    too, so an operator cannot sign beats that pass off another's worker as its own.
    """
    return isinstance(worker, str) and worker.startswith(operator + "/") and len(worker) > len(operator) + 1


def _number(value: Any) -> float | None:
    """``value`` if it is a finite int or float (not a bool), else None."""
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def share(charge: int, share_ppm: int) -> int:
    """The operator's part of ``charge``: rounded down, so the house keeps the odd unit."""
    return charge * share_ppm // fees.PPM


# --- earnings -----------------------------------------------------------------------


#: What leaves an operator's account to the world: its payouts and any plain withdrawal.
PAID_OUT_KINDS = ("payout", "withdraw")


def _sums(session: Session, account_ids: list[int]) -> dict[tuple[int, str], int]:
    """Earned (credited) and paid out (debited) totals per operator account."""
    earned = session.execute(
        select(Transfer.credit_account_id, func.sum(Transfer.amount))
        .where(Transfer.kind == "earn", Transfer.credit_account_id.in_(account_ids))
        .group_by(Transfer.credit_account_id)
    )
    paid = session.execute(
        select(Transfer.debit_account_id, func.sum(Transfer.amount))
        .where(Transfer.kind.in_(PAID_OUT_KINDS), Transfer.debit_account_id.in_(account_ids))
        .group_by(Transfer.debit_account_id)
    )
    # PostgreSQL sums BIGINT to NUMERIC (a Decimal); money stays int.
    return {**{(a, "earn"): int(t) for a, t in earned}, **{(a, "payout"): int(t) for a, t in paid}}


def _describe(operator: Operator, account: Account, sums: dict[tuple[int, str], int], jobs: int) -> dict[str, Any]:
    return {
        "operator": operator.name,  # its account's name too
        "key_id": signing.key_id(signing.decode_public(operator.public_key)),
        "public_key": operator.public_key,
        "earned": sums.get((account.id, "earn"), 0),
        "paid_out": sums.get((account.id, "payout"), 0),
        "balance": int(account.balance),
        "jobs": jobs,
    }


def list_operators(session: Session) -> list[dict[str, Any]]:
    """Every operator by name: account, key id, earned, paid out, balance and jobs attributed."""
    rows = session.execute(
        select(Operator, Account)
        .join(Account, Account.id == Operator.account_id)
        .order_by(Operator.name)
        .execution_options(populate_existing=True)  # balances as stored now, not as first loaded
    ).all()
    sums = _sums(session, [account.id for _, account in rows])
    jobs = {
        name: int(count)
        for name, count in session.execute(
            select(JobRow.operator, func.count()).where(JobRow.operator.is_not(None)).group_by(JobRow.operator)
        )
    }
    return [_describe(operator, account, sums, jobs.get(operator.name, 0)) for operator, account in rows]


def earnings(session: Session, name: str) -> dict[str, Any]:
    """One operator's account, key id, earned, paid out, balance and jobs attributed to it."""
    operator = operator_by_name(session, name)
    account = session.get(Account, operator.account_id)
    assert account is not None
    session.refresh(account, ["balance"])
    jobs = session.scalar(select(func.count()).select_from(JobRow).where(JobRow.operator == name)) or 0
    return _describe(operator, account, _sums(session, [account.id]), int(jobs))


def payout(session: Session, name: str, amount: int) -> None:
    """Pay ``amount`` of operator ``name``'s balance out to the world."""
    operator = operator_by_name(session, name)
    account = session.get(Account, operator.account_id)
    assert account is not None
    ledger.payout(session, account, amount)
