"""The double-entry ledger: accounts, API keys and every movement of money.

Functions take a ``Session`` and never commit: the caller owns the
transaction, so admission can hold money and insert its job row atomically,
and settlement can capture and release in one step. After any exception
here the caller should roll back.

Each movement is a ``Transfer`` row plus two balance updates. The debit is a
conditional ``UPDATE … WHERE balance >= :amount``, so no balance is read
before it is changed and two concurrent spenders cannot both pass a check.
"""

from __future__ import annotations

import hashlib
import secrets
import weakref
from typing import Any, Literal, cast

from sqlalchemy import Connection, CursorResult, case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from router.core.errors import (
    AccountExists,
    HoldExceeded,
    InsufficientFunds,
    InvalidAccountName,
    InvalidAmount,
    SystemAccount,
    UnknownAccount,
)
from router.core.fees import MAX_AMOUNT
from router.core.models import ESCROW, FROM_HOLD_KINDS, REVENUE, SYSTEM_ACCOUNTS, WORLD, Account, Transfer

TransferKind = Literal["deposit", "withdraw", "hold", "capture", "release", "earn", "payout"]

#: Every API key starts with this, so a leaked one is recognisable in logs and scanners.
API_KEY_PREFIX = "llm_"
#: Longest account name (the column is VARCHAR(200)).
MAX_NAME_LEN = 200
_SYSTEM_IDS: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def hash_api_key(api_key: str) -> str:
    """The sha256 hex under which an API key is stored and looked up."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def _new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def _valid_amount(amount: object) -> int:
    """Return ``amount`` if it is a positive int that fits a balance, else raise."""
    # bool is an int subclass, and True would quietly move 1.
    if type(amount) is not int or not 0 < amount <= MAX_AMOUNT:
        raise InvalidAmount(amount)
    return amount


def _system_ids(session: Session) -> dict[str, int]:
    """Ids of world, escrow and revenue, looked up once per database connection pool.

    The migration creates them and nothing ever changes them, so one lookup
    serves every transaction of an engine (keyed by its pool, which a
    read-only copy of the engine shares).
    """
    bind = session.get_bind()
    pool = (bind.engine if isinstance(bind, Connection) else bind).pool
    ids = _SYSTEM_IDS.get(pool)
    if ids is None:
        rows = session.execute(
            select(Account.name, Account.id).where(
                Account.kind == "system", Account.name.in_(SYSTEM_ACCOUNTS)
            )
        )
        ids = {name: id_ for name, id_ in rows}
        missing = set(SYSTEM_ACCOUNTS) - ids.keys()
        if missing:
            # The migration creates them; a ledger without them was never upgraded.
            raise UnknownAccount(", ".join(sorted(missing)))
        _SYSTEM_IDS[pool] = ids
    return ids


def _require_user(account: Account) -> None:
    # Escrow and revenue change only through holds and settlement, and a
    # system account must never get an API key that could spend from it.
    if account.kind != "user":
        raise SystemAccount(account.name)


def _lock_in_id_order(session: Session, *account_ids: int) -> None:
    """On PostgreSQL, lock the accounts' rows lowest id first, to rule out deadlocks."""
    # A hold updates user then escrow, a release escrow then user; without one
    # order, the two on the same user at once deadlock. SQLite needs nothing:
    # BEGIN IMMEDIATE gives the transaction the whole database's write lock.
    if session.get_bind().dialect.name != "sqlite":
        session.execute(
            select(Account.id)
            .where(Account.id.in_(account_ids))
            .order_by(Account.id)
            .with_for_update()
        )


def _add_to_balance(session: Session, account_id: int, delta: int, *, floor: bool) -> bool:
    """Add ``delta`` to a balance; with ``floor``, only if it stays >= 0. True if done."""
    stmt = (
        update(Account)
        .where(Account.id == account_id)
        .values(balance=Account.balance + delta)
        .execution_options(synchronize_session=False)
    )
    if floor:
        stmt = stmt.where(Account.balance >= -delta)
    result = cast("CursorResult[Any]", session.execute(stmt))
    # The UPDATE bypassed the identity map; make a loaded Account re-read its balance.
    loaded = session.identity_map.get(identity_key(Account, account_id))
    if loaded is not None:
        session.expire(loaded, ["balance"])
    return result.rowcount == 1


def _move(
    session: Session,
    debit_id: int,
    credit_id: int,
    amount: object,
    kind: TransferKind,
    job_id: str | None = None,
    *,
    within_hold: bool = False,
) -> Transfer:
    """Move ``amount`` from debit to credit as one transfer; the caller commits."""
    amount = _valid_amount(amount)
    _lock_in_id_order(session, debit_id, credit_id)
    if within_hold:
        # Safe to read-then-write: the escrow row is locked (or, on SQLite,
        # the database), so no other capture or release of this job interleaves.
        held = held_for(session, cast(str, job_id))
        if amount > held:
            raise HoldExceeded(job_id, held, amount)
    world_id = _system_ids(session)[WORLD]
    if not _add_to_balance(session, debit_id, -amount, floor=debit_id != world_id):
        row = session.execute(
            select(Account.name, Account.balance).where(Account.id == debit_id)
        ).one_or_none()
        if row is None:
            raise UnknownAccount(debit_id)
        raise InsufficientFunds(row.name, row.balance, amount)
    if not _add_to_balance(session, credit_id, amount, floor=False):
        raise UnknownAccount(credit_id)
    transfer = Transfer(
        debit_account_id=debit_id,
        credit_account_id=credit_id,
        amount=amount,
        kind=kind,
        job_id=job_id,
    )
    session.add(transfer)
    return transfer


# --- accounts and keys -------------------------------------------------------


def create_account(session: Session, name: str, deposit: int = 0) -> tuple[Account, str]:
    """Open a requester account, optionally funded; returns it and its API key.

    The key is returned only here (and by ``rotate_key``): only its sha256 is stored.
    """
    if not name or not name.isprintable() or name != name.strip():
        raise InvalidAccountName(name, "must be non-empty printable text without edge spaces")
    if len(name) > MAX_NAME_LEN:
        raise InvalidAccountName(name, f"longer than {MAX_NAME_LEN} characters")
    if deposit != 0 or type(deposit) is not int:
        _valid_amount(deposit)
    api_key = _new_api_key()
    account = Account(
        name=name,
        kind="user",
        api_key_hash=hash_api_key(api_key),
        webhook_secret=secrets.token_hex(32),
        balance=0,
    )
    try:
        # A savepoint, so a taken name leaves the caller's transaction usable
        # (PostgreSQL aborts the whole transaction on an error otherwise).
        with session.begin_nested():
            session.add(account)
    except IntegrityError:
        raise AccountExists(name) from None
    if deposit:
        _move(session, _system_ids(session)[WORLD], account.id, deposit, "deposit")
    return account, api_key


def account_by_name(session: Session, name: str) -> Account:
    """Find an account (requester or system) by its name."""
    account = session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise UnknownAccount(name)
    return account


def account_by_key(session: Session, api_key: str) -> Account:
    """Find the requester account an API key belongs to."""
    account = session.scalar(select(Account).where(Account.api_key_hash == hash_api_key(api_key)))
    if account is None:
        # Never echo the key: errors end up in logs and HTTP bodies.
        raise UnknownAccount("(that API key)")
    return account


def rotate_key(session: Session, account: Account) -> str:
    """Replace a requester's API key; returns the new key, the old one stops working."""
    _require_user(account)
    api_key = _new_api_key()
    account.api_key_hash = hash_api_key(api_key)
    session.flush()
    return api_key


def balance(session: Session, account: Account) -> int:
    """An account's balance as committed or changed in this transaction."""
    value = session.scalar(select(Account.balance).where(Account.id == account.id))
    if value is None:
        raise UnknownAccount(account.name)
    return int(value)


# --- movements ---------------------------------------------------------------


def deposit(session: Session, account: Account, amount: int) -> Transfer:
    """Credit a requester with money paid in from the outside world."""
    _require_user(account)
    return _move(session, _system_ids(session)[WORLD], account.id, amount, "deposit")


def withdraw(session: Session, account: Account, amount: int) -> Transfer:
    """Pay money out of a requester's balance to the outside world."""
    _require_user(account)
    return _move(session, account.id, _system_ids(session)[WORLD], amount, "withdraw")


def hold(session: Session, account: Account, amount: int, job_id: str) -> Transfer:
    """Move a job's offered fee from the requester into escrow at admission."""
    _require_user(account)
    return _move(session, account.id, _system_ids(session)[ESCROW], amount, "hold", job_id)


def capture(session: Session, amount: int, job_id: str) -> Transfer:
    """Charge a settled job: move part of its hold from escrow to revenue."""
    ids = _system_ids(session)
    return _move(
        session, ids[ESCROW], ids[REVENUE], amount, "capture", job_id, within_hold=True
    )


def earn(session: Session, operator_account: Account, amount: int, job_id: str) -> Transfer:
    """Pay an operator its share of a settled job's charge: from the job's hold to the operator."""
    _require_user(operator_account)
    return _move(
        session,
        _system_ids(session)[ESCROW],
        operator_account.id,
        amount,
        "earn",
        job_id,
        within_hold=True,
    )


def payout(session: Session, operator_account: Account, amount: int) -> Transfer:
    """Pay an operator's earnings out to the outside world (a withdrawal kept apart)."""
    _require_user(operator_account)
    return _move(session, operator_account.id, _system_ids(session)[WORLD], amount, "payout")


def release(session: Session, account: Account, amount: int, job_id: str) -> Transfer:
    """Return (part of) a job's hold from escrow to the requester."""
    _require_user(account)
    return _move(
        session,
        _system_ids(session)[ESCROW],
        account.id,
        amount,
        "release",
        job_id,
        within_hold=True,
    )


def held_for(session: Session, job_id: str) -> int:
    """What escrow still holds for a job: its holds minus what captures, releases and earns took."""
    signed = case((Transfer.kind == "hold", Transfer.amount), else_=-Transfer.amount)
    total = session.scalar(
        select(func.coalesce(func.sum(signed), 0)).where(
            Transfer.job_id == job_id, Transfer.kind.in_(("hold", *FROM_HOLD_KINDS))
        )
    )
    # PostgreSQL sums BIGINT to NUMERIC (a Decimal); money stays int.
    return int(total or 0)


# --- audit -------------------------------------------------------------------


def check(session: Session) -> list[str]:
    """Audit the books; returns one line per problem, empty when they balance."""
    problems: list[str] = []
    credits = (
        select(Transfer.credit_account_id.label("id"), func.sum(Transfer.amount).label("total"))
        .group_by(Transfer.credit_account_id)
        .subquery()
    )
    debits = (
        select(Transfer.debit_account_id.label("id"), func.sum(Transfer.amount).label("total"))
        .group_by(Transfer.debit_account_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Account.name,
            Account.balance,
            func.coalesce(credits.c.total, 0) - func.coalesce(debits.c.total, 0),
        )
        .outerjoin(credits, credits.c.id == Account.id)
        .outerjoin(debits, debits.c.id == Account.id)
        .order_by(Account.id)
    ).all()
    total = 0
    balances: dict[str, int] = {}
    for name, stored, from_transfers in rows:
        stored, from_transfers = int(stored), int(from_transfers)
        balances[name] = stored
        total += stored
        if stored != from_transfers:
            problems.append(
                f"account {name!r}: balance {stored} but its transfers sum to {from_transfers}"
            )
        if stored < 0 and name != WORLD:
            problems.append(f"account {name!r}: negative balance {stored}")
    if total != 0:
        problems.append(f"balances sum to {total}, not 0: money was created or destroyed")

    signed = case((Transfer.kind == "hold", Transfer.amount), else_=-Transfer.amount)
    per_job = session.execute(
        select(Transfer.job_id, func.sum(signed))
        .where(Transfer.kind.in_(("hold", *FROM_HOLD_KINDS)))
        .group_by(Transfer.job_id)
        .order_by(Transfer.job_id)
    ).all()
    open_holds = 0
    for job_id, held in per_job:
        held = int(held)
        open_holds += held
        if held < 0:
            problems.append(f"job {job_id}: captured, released and earned {-held} more than it held")
    escrow = balances.get(ESCROW)
    if escrow is None:
        problems.append("the escrow account is missing")
    elif escrow != open_holds:
        problems.append(f"escrow balance {escrow} but open holds sum to {open_holds}")
    return problems
