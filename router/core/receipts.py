"""Signed receipts of ended jobs: what a job was, what it cost and where its money went.

A receipt is a work envelope's shape (``llama_tasks.signing``): a payload
with ``"kind": "llamas.receipt"`` and ``"version": 1``, signed by the
herder's Ed25519 key, so anyone holding the herder's public key can check
it offline. Its money figures are summed from the ledger's transfers for the
job, not copied from the job row; when the two disagree no receipt is
signed (``ReceiptMismatch``): a signature must never vouch for a wrong sum.
Money is integers; times are Unix seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llama_tasks import signing
from llama_tasks.errors import BadSignature, UnknownSigner, Unsigned
from router.core import fees
from router.core.errors import InvalidReceipt, JobNotFinished, ReceiptMismatch
from router.core.models import FINAL_STATES, Account, JobRow, Transfer

log = logging.getLogger(__name__)

#: The payload's ``kind``: tells a receipt from any other envelope the herder signs.
KIND = "llamas.receipt"
#: The payload's ``version``: bumped when a field changes meaning or goes away.
VERSION = 1

#: Transfer kinds summed into each figure. ``earn`` (the operator's share of a
#: charge, paid from escrow in the same settlement) is part of what was
#: charged; a ledger that has no such transfers simply sums none.
HELD_KINDS = ("hold",)
CHARGED_KINDS = ("capture", "earn")
REFUNDED_KINDS = ("release",)

#: Every key of a version 1 payload, in the order ``build`` writes them.
FIELDS: tuple[str, ...] = (
    "kind", "version", "job_id", "account", "model", "model_id", "state",
    "prompt_tokens", "completion_tokens", "cached_tokens", "max_tokens", "n",
    "quote", "base_fee", "fee_per_token", "fee_per_cached_token", "bid_ppm", "multiplier",
    "held", "charged", "refunded", "worker",
    "created_at", "dispatched_at", "finished_at", "issued_at",
)
#: Keys a payload carries only when the job has them.
OPTIONAL_FIELDS: tuple[str, ...] = ("operator",)
#: Keys that must be integers (money and token counts; never a float near a balance).
INTEGER_FIELDS: tuple[str, ...] = ("version", "prompt_tokens", "max_tokens", "n", "quote", "bid_ppm",
                                   "held", "charged", "refunded")


@dataclass(frozen=True)
class Figures:
    """A job's money as its transfers say: held into escrow, charged out of it, refunded from it."""

    held: int
    charged: int
    refunded: int


def figures(session: Session, job_id: str) -> Figures:
    """Sum the job's transfers by kind into held, charged and refunded."""
    rows = session.execute(
        select(Transfer.kind, func.sum(Transfer.amount)).where(Transfer.job_id == job_id).group_by(Transfer.kind)
    )
    # PostgreSQL sums BIGINT to NUMERIC (a Decimal); money stays int.
    sums = {kind: int(total) for kind, total in rows}

    def total(kinds: tuple[str, ...]) -> int:
        return sum(sums.get(kind, 0) for kind in kinds)

    return Figures(total(HELD_KINDS), total(CHARGED_KINDS), total(REFUNDED_KINDS))


def _agree(row: JobRow, found: Figures) -> None:
    """Raise ``ReceiptMismatch`` unless the row's money is what its transfers say."""
    expected = {"held": row.offered, "charged": row.charged, "refunded": row.refunded}
    for figure, on_row in expected.items():
        in_ledger = getattr(found, figure)
        if on_row != in_ledger:
            log.error("receipt for job %s not signed: %s is %s on the job row but %s in the ledger",
                      row.id, figure, on_row, in_ledger)
            raise ReceiptMismatch(row.id, figure, on_row, in_ledger)
    if found.held != found.charged + found.refunded:
        # An ended job's escrow is empty: whatever is left there is unaccounted for.
        log.error("receipt for job %s not signed: held %d but charged %d + refunded %d",
                  row.id, found.held, found.charged, found.refunded)
        raise ReceiptMismatch(row.id, "held - charged - refunded", 0, found.held - found.charged - found.refunded)


def multiplier_text(bid_ppm: int) -> str:
    """The bid as an exact decimal: 1_500_000 → ``"1.5"``, 2_000_000 → ``"2"``."""
    whole, part = divmod(bid_ppm, fees.PPM)
    digits = str(part).rjust(len(str(fees.PPM)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def build(session: Session, row: JobRow, *, issued_at: float) -> dict[str, Any]:
    """The receipt payload of an ended job, its money summed from the ledger (``signing.sign`` it next).

    The model id is the sha256 the worker that produced the result reported
    (the registry id it checked its file against), kept on the job when it
    settled. Raises ``JobNotFinished`` for an open job and ``ReceiptMismatch``
    when the row and the ledger disagree.
    """
    if row.state not in FINAL_STATES:
        raise JobNotFinished(row.id, row.state)
    found = figures(session, row.id)
    _agree(row, found)
    account = session.get(Account, row.account_id)
    assert account is not None  # a foreign key, and the caller found the job through it
    payload: dict[str, Any] = {
        "kind": KIND,
        "version": VERSION,
        "job_id": row.id,
        "account": account.name,
        "model": row.model,
        # None when the job did not finish, or settled before the id was kept.
        "model_id": row.model_id,
        "state": row.state,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cached_tokens": row.cached_tokens,
        "max_tokens": row.max_tokens,
        "n": row.n,
        "quote": row.quote,
        # The prices the quote was made at (None only for jobs admitted before they were recorded).
        "base_fee": row.base_fee,
        "fee_per_token": row.fee_per_token,
        "fee_per_cached_token": row.fee_per_cached_token,
        "bid_ppm": row.bid_ppm,
        "multiplier": multiplier_text(row.bid_ppm),
        "held": found.held,
        "charged": found.charged,
        "refunded": found.refunded,
        "worker": row.worker,
        "created_at": row.created_at,
        "dispatched_at": row.dispatched_at,
        "finished_at": row.finished_at,
        "issued_at": issued_at,
    }
    if row.operator is not None:
        payload["operator"] = row.operator
    return payload


def verify(envelope: Any, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The payload of a receipt ``public_key`` signed; ``InvalidReceipt`` naming the failed check otherwise."""
    try:
        payload = signing.verify(envelope, public_key)
    except Unsigned:
        raise InvalidReceipt("shape", "not an envelope of payload, key_id and sig") from None
    except UnknownSigner as exc:
        raise InvalidReceipt("key_id", f"signed by key {exc.key_id}, not by {exc.expected}") from None
    except BadSignature:
        raise InvalidReceipt("signature", "the signature does not match the payload") from None
    # Signed by the herder, but perhaps not a receipt (an envelope of work), or one this code cannot read.
    if payload.get("kind") != KIND:
        raise InvalidReceipt("kind", f"kind is {payload.get('kind')!r}, not {KIND!r}")
    if payload.get("version") != VERSION:
        raise InvalidReceipt("version", f"version {payload.get('version')!r} is not {VERSION}")
    missing = sorted(set(FIELDS) - payload.keys())
    unknown = sorted(payload.keys() - set(FIELDS) - set(OPTIONAL_FIELDS))
    if missing or unknown:
        raise InvalidReceipt("shape", f"missing {missing}, unknown {unknown}")
    wrong = [f for f in INTEGER_FIELDS if type(payload[f]) is not int]
    if wrong:
        raise InvalidReceipt("shape", f"not integers: {wrong}")
    return payload


def summary(payload: dict[str, Any], key_id: str) -> str:
    """One line that says what a verified receipt vouches for."""
    model_id = payload["model_id"] or "unregistered"
    return (f"valid receipt: job {payload['job_id']} {payload['state']} for account {payload['account']!r}, "
            f"model {payload['model']} ({model_id[:16]}), {payload['prompt_tokens']} prompt + "
            f"{payload['completion_tokens'] or 0} completion tokens at ×{payload['multiplier']}: "
            f"held {payload['held']}, charged {payload['charged']}, refunded {payload['refunded']}; "
            f"signed by key {key_id}")
