"""The double-entry ledger: accounts, API keys and every movement of money.

Functions take a ``Session`` and never commit: the caller owns the
transaction, so admission can hold money and insert its job row atomically,
and settlement can capture and release in one step. After any exception
here the caller should roll back.

Each movement is a ``Transfer`` row plus two balance updates. The debit is a
conditional ``UPDATE … WHERE balance >= :amount``, so no balance is read
before it is changed and two concurrent spenders cannot both pass a check.

No row is written by every transaction: escrow's balance is kept in parts,
one per job with money held (a hold adds to its job's part, a capture,
earn or release takes from it, never past zero), and revenue's in a few
shards (``models.PARTED_ACCOUNTS``). Movements of different jobs therefore
lock only their requesters' rows and their own parts, and two admissions
or settlements meet only on a requester they share (or, one time in
``REVENUE_SHARDS``, on a revenue shard).
"""

from __future__ import annotations

import hashlib
import secrets
import weakref
import zlib
from typing import Any, Literal, NamedTuple, cast

from sqlalchemy import Connection, bindparam, case, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
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
from router.core.models import (
    ESCROW,
    FROM_HOLD_KINDS,
    REVENUE,
    REVENUE_SHARDS,
    SYSTEM_ACCOUNTS,
    WORLD,
    Account,
    AccountPart,
    Transfer,
)

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


class Requester(NamedTuple):
    """The columns of an account that admitting its request reads: a plain row, cheaper to load than an
    ``Account`` (no ORM object, no balance summed over its parts)."""

    id: int
    name: str
    kind: str
    api_key_hash: str | None


def _require_user(account: Account | Requester) -> None:
    # Escrow and revenue change only through holds and settlement, and a
    # system account must never get an API key that could spend from it.
    if account.kind != "user":
        raise SystemAccount(account.name)


def lock_accounts(session: Session, *account_ids: int) -> None:
    """On PostgreSQL, lock requesters' rows lowest id first, to rule out deadlocks.

    A transaction that moves money of two requesters (a settlement paying an
    operator and refunding its requester) locks both first, in one order.
    SQLite needs nothing: BEGIN IMMEDIATE gives the transaction the whole
    database's write lock.
    """
    if len(set(account_ids)) > 1 and session.get_bind().dialect.name != "sqlite":
        session.execute(
            select(Account.id)
            .where(Account.id.in_(account_ids))
            .order_by(Account.id)
            .with_for_update()
        )


def _part_of(ids: dict[str, int], account_id: int, job_id: str | None) -> str | None:
    """The part of a parted account a movement of ``job_id`` writes; None for an account kept whole."""
    if account_id == ids[ESCROW]:
        if job_id is None:
            raise ValueError("money moves through escrow only for a job")
        return job_id
    if account_id == ids[REVENUE]:
        # The same job always meets the same shard; two jobs meet one in REVENUE_SHARDS.
        return f"shard-{zlib.crc32(str(job_id).encode()) % REVENUE_SHARDS}"
    return None


# Built once: building a statement costs more than running it (its cache key, its coercions), and these run
# in every admission and settlement. Run on the transaction's connection: they bypass the identity map anyway.
_ADD_TO_BALANCE = (
    update(Account)
    .where(Account.id == bindparam("p_account_id"))
    .values(own_balance=Account.own_balance + bindparam("p_delta"))
)
_ADD_TO_BALANCE_FLOORED = _ADD_TO_BALANCE.where(Account.own_balance >= bindparam("p_floor"))


def _credit_part_statement(dialect_insert: Any) -> Any:
    """Add ``:p_amount`` to a part, creating it at the first credit (one dialect's upsert)."""
    stmt = dialect_insert(AccountPart).values(account_id=bindparam("p_account_id"), part=bindparam("p_part"),
                                              balance=bindparam("p_amount"))
    return stmt.on_conflict_do_update(index_elements=["account_id", "part"],
                                      set_={"balance": AccountPart.balance + stmt.excluded.balance})


_CREDIT_PART = {"postgresql": _credit_part_statement(postgresql_insert), "sqlite": _credit_part_statement(sqlite_insert)}
_THIS_PART = (AccountPart.account_id == bindparam("p_account_id"), AccountPart.part == bindparam("p_part"))
_DEBIT_PART = (
    update(AccountPart)
    .where(*_THIS_PART, AccountPart.balance >= bindparam("p_amount"))
    .values(balance=AccountPart.balance - bindparam("p_amount"))
    .returning(AccountPart.balance)
)
_DROP_PART = delete(AccountPart).where(*_THIS_PART, AccountPart.balance == 0)
_INSERT_TRANSFER = insert(Transfer)
_PART_BALANCE = select(AccountPart.balance).where(*_THIS_PART)


def _add_to_balance(session: Session, account_id: int, delta: int, *, floor: bool) -> bool:
    """Add ``delta`` to an account's own column; with ``floor``, only if it stays >= 0. True if done."""
    stmt, params = _ADD_TO_BALANCE, {"p_account_id": account_id, "p_delta": delta}
    if floor:
        stmt, params = _ADD_TO_BALANCE_FLOORED, {**params, "p_floor": -delta}
    result = session.connection().execute(stmt, params)
    _expire(session, account_id)
    return result.rowcount == 1


def _expire(session: Session, account_id: int) -> None:
    # The UPDATE bypassed the identity map; make a loaded Account re-read its balance.
    loaded = session.identity_map.get(identity_key(Account, account_id))
    if loaded is not None:
        session.expire(loaded, ["own_balance", "balance"])


def _credit_part(session: Session, account_id: int, part: str, amount: int) -> None:
    """Add ``amount`` to a part, creating it at the first credit."""
    connection = session.connection()
    connection.execute(_CREDIT_PART[connection.dialect.name],
                       {"p_account_id": account_id, "p_part": part, "p_amount": amount})
    _expire(session, account_id)


def _debit_part(session: Session, account_id: int, part: str, amount: int) -> bool:
    """Take ``amount`` from a part if it holds that much, and drop the part once it is empty. True if done."""
    connection = session.connection()
    this = {"p_account_id": account_id, "p_part": part}
    left = connection.execute(_DEBIT_PART, {**this, "p_amount": amount}).scalar_one_or_none()
    if left is None:
        return False
    if left == 0:
        # Escrow keeps a part only while its job holds money: its sum stays over open jobs.
        connection.execute(_DROP_PART, this)
    _expire(session, account_id)
    return True


def _move(
    session: Session,
    debit_id: int,
    credit_id: int,
    amount: object,
    kind: TransferKind,
    job_id: str | None = None,
) -> None:
    """Move ``amount`` from debit to credit as one transfer; the caller commits.

    Escrow's side of a movement is the job's own part, debited only down to
    zero: a job never gives back more than it holds (``HoldExceeded``).
    """
    amount = _valid_amount(amount)
    ids = _system_ids(session)
    debit_part, credit_part = _part_of(ids, debit_id, job_id), _part_of(ids, credit_id, job_id)
    if debit_part is None and credit_part is None:
        lock_accounts(session, debit_id, credit_id)
    if debit_part is not None:
        if not _debit_part(session, debit_id, debit_part, amount):
            if debit_id == ids[ESCROW]:
                raise HoldExceeded(job_id, held_for(session, cast(str, job_id)), amount)
            raise InsufficientFunds(REVENUE, balance_of(session, debit_id), amount)
    elif not _add_to_balance(session, debit_id, -amount, floor=debit_id != ids[WORLD]):
        row = session.execute(
            select(Account.name, Account.balance).where(Account.id == debit_id)
        ).one_or_none()
        if row is None:
            raise UnknownAccount(debit_id)
        raise InsufficientFunds(row.name, row.balance, amount)
    if credit_part is not None:
        _credit_part(session, credit_id, credit_part, amount)
    elif not _add_to_balance(session, credit_id, amount, floor=False):
        raise UnknownAccount(credit_id)
    session.connection().execute(_INSERT_TRANSFER, {"debit_account_id": debit_id, "credit_account_id": credit_id,
                                                    "amount": amount, "kind": kind, "job_id": job_id})


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


_BY_KEY = select(Account).where(Account.api_key_hash == bindparam("p_key_hash"))


def account_by_key(session: Session, api_key: str) -> Account:
    """Find the requester account an API key belongs to (admission, which locks it, uses ``requester_by_key``)."""
    account = session.scalar(_BY_KEY, {"p_key_hash": hash_api_key(api_key)})
    if account is None:
        # Never echo the key: errors end up in logs and HTTP bodies.
        raise UnknownAccount("(that API key)")
    return account


_REQUESTER_BY_KEY = select(Account.id, Account.name, Account.kind, Account.api_key_hash).where(
    Account.api_key_hash == bindparam("p_key_hash"))
_REQUESTER_BY_KEY_LOCKED = _REQUESTER_BY_KEY.with_for_update(of=Account)


def requester_by_key(session: Session, api_key: str, lock: bool = False) -> Requester:
    """The requester an API key belongs to, as a plain row on the transaction's connection; with ``lock``,
    its row is locked until commit (PostgreSQL)."""
    connection = session.connection()
    stmt = _REQUESTER_BY_KEY_LOCKED if lock and connection.dialect.name == "postgresql" else _REQUESTER_BY_KEY
    row = connection.execute(stmt, {"p_key_hash": hash_api_key(api_key)}).one_or_none()
    if row is None:
        raise UnknownAccount("(that API key)")  # never the key: errors end up in logs and HTTP bodies
    return Requester(*row)


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


def balance_of(session: Session, account_id: int) -> int:
    """The balance of the account with ``account_id`` (0 if there is none)."""
    return int(session.scalar(select(Account.balance).where(Account.id == account_id)) or 0)


# --- movements ---------------------------------------------------------------


def deposit(session: Session, account: Account, amount: int) -> None:
    """Credit a requester with money paid in from the outside world."""
    _require_user(account)
    _move(session, _system_ids(session)[WORLD], account.id, amount, "deposit")


def withdraw(session: Session, account: Account, amount: int) -> None:
    """Pay money out of a requester's balance to the outside world."""
    _require_user(account)
    _move(session, account.id, _system_ids(session)[WORLD], amount, "withdraw")


def hold(session: Session, account: Account | Requester, amount: int, job_id: str) -> None:
    """Move a job's offered fee from the requester into escrow at admission."""
    _require_user(account)
    _move(session, account.id, _system_ids(session)[ESCROW], amount, "hold", job_id)


def capture(session: Session, amount: int, job_id: str) -> None:
    """Charge a settled job: move part of its hold from escrow to revenue."""
    ids = _system_ids(session)
    _move(session, ids[ESCROW], ids[REVENUE], amount, "capture", job_id)


def earn(session: Session, operator_account: Account, amount: int, job_id: str) -> None:
    """Pay an operator its share of a settled job's charge: from the job's hold to the operator."""
    _require_user(operator_account)
    _move(
        session,
        _system_ids(session)[ESCROW],
        operator_account.id,
        amount,
        "earn",
        job_id,
    )


def payout(session: Session, operator_account: Account, amount: int) -> None:
    """Pay an operator's earnings out to the outside world (a withdrawal kept apart)."""
    _require_user(operator_account)
    _move(session, operator_account.id, _system_ids(session)[WORLD], amount, "payout")


def release(session: Session, account: Account, amount: int, job_id: str) -> None:
    """Return (part of) a job's hold from escrow to the requester."""
    _require_user(account)
    _move(
        session,
        _system_ids(session)[ESCROW],
        account.id,
        amount,
        "release",
        job_id,
    )


def held_for(session: Session, job_id: str) -> int:
    """What escrow still holds for a job: its part of escrow (its holds minus what captures,
    releases and earns took, as ``check`` proves)."""
    return int(session.scalar(_PART_BALANCE, {"p_account_id": _system_ids(session)[ESCROW], "p_part": job_id}) or 0)


# --- audit -------------------------------------------------------------------


def check(session: Session) -> list[str]:
    """Audit the books; returns one line per problem, empty when they balance.

    It proves: every account's balance (its own column plus its parts) is
    what its transfers credited minus what they debited; the balances sum to
    zero (money is only created or destroyed at the world); no balance but the
    world's is negative; every job's part of escrow is what its holds put in
    minus what its captures, earns and releases took, never negative, and
    escrow has no part for a job holding nothing; escrow's own column is 0,
    so escrow's balance is exactly the sum of the open holds.
    """
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
            Account.own_balance,
            Account.balance,
            func.coalesce(credits.c.total, 0) - func.coalesce(debits.c.total, 0),
        )
        .outerjoin(credits, credits.c.id == Account.id)
        .outerjoin(debits, debits.c.id == Account.id)
        .order_by(Account.id)
    ).all()
    total = 0
    balances: dict[str, int] = {}
    for name, own, stored, from_transfers in rows:
        stored, from_transfers = int(stored), int(from_transfers)
        balances[name] = stored
        total += stored
        if stored != from_transfers:
            problems.append(
                f"account {name!r}: balance {stored} but its transfers sum to {from_transfers}"
            )
        if stored < 0 and name != WORLD:
            problems.append(f"account {name!r}: negative balance {stored}")
        if name == ESCROW and own:
            problems.append(f"escrow's own column holds {own}, not 0: money moved through escrow outside a hold")
    if total != 0:
        problems.append(f"balances sum to {total}, not 0: money was created or destroyed")
    problems += _check_holds(session, balances.get(ESCROW))
    return problems


def _check_holds(session: Session, escrow: int | None) -> list[str]:
    """Every job's part of escrow against its transfers, and escrow against the open holds."""
    problems: list[str] = []
    signed = case((Transfer.kind == "hold", Transfer.amount), else_=-Transfer.amount)
    per_job = session.execute(
        select(Transfer.job_id, func.sum(signed))
        .where(Transfer.kind.in_(("hold", *FROM_HOLD_KINDS)))
        .group_by(Transfer.job_id)
        .order_by(Transfer.job_id)
    ).all()
    parts: dict[str, int] = {}
    if escrow is not None:
        parts = {part: int(amount) for part, amount in session.execute(
            select(AccountPart.part, AccountPart.balance).where(
                AccountPart.account_id == _system_ids(session)[ESCROW]))}
    open_holds = 0
    for job_id, held in per_job:
        held = int(held)
        open_holds += held
        if held < 0:
            problems.append(f"job {job_id}: captured, released and earned {-held} more than it held")
        part = parts.pop(job_id, 0)
        if part != max(held, 0):
            problems.append(f"job {job_id}: escrow's part for it is {part} but its transfers leave {held} held")
    for job_id, part in sorted(parts.items()):
        problems.append(f"escrow has a part of {part} for {job_id!r}, which no hold explains")
    if escrow is None:
        problems.append("the escrow account is missing")
    elif escrow != open_holds:
        problems.append(f"escrow balance {escrow} but open holds sum to {open_holds}")
    return problems
