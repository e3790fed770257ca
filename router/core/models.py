"""Tables of the herder's database: accounts, the transfers between them, operators, and jobs.

All tables share ``Base.metadata``; migrations in
``router/core/migrations/versions`` create them, never ``metadata.create_all``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    cast,
    false,
    func,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column

from router.core.sealing import SealedText

#: The outside world: deposits come from it and withdrawals go to it, so its
#: balance is minus the money inside the service. The only account that may
#: go negative.
WORLD = "world"
#: Money held for admitted jobs until they settle. Its balance is the sum of
#: its parts, one per job with money held (``AccountPart``): no transaction
#: writes a row that every other one writes too.
ESCROW = "escrow"
#: Fees earned by the service. Its balance is its own column (what it earned
#: before migration 0012) plus ``REVENUE_SHARDS`` parts; a capture adds to the
#: part its job's id picks, so two settlements rarely write one row.
REVENUE = "revenue"
SYSTEM_ACCOUNTS = (WORLD, ESCROW, REVENUE)
#: Accounts whose balance lives in parts: every hold, capture, release and earn writes one of them.
PARTED_ACCOUNTS = (ESCROW, REVENUE)
#: Parts revenue is spread over.
REVENUE_SHARDS = 256

#: Every kind of transfer. ``earn`` moves an operator's share of a job's charge
#: from escrow to the operator; ``payout`` pays an operator out to the world.
TRANSFER_KINDS = ("deposit", "withdraw", "hold", "capture", "release", "earn", "payout")
#: Kinds that move a job's money out of escrow: with ``hold``, they say what a job still holds.
FROM_HOLD_KINDS = ("capture", "release", "earn")

#: Deterministic constraint names, so later migrations (and SQLite batch
#: mode, which recreates tables) can refer to them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every herder table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AccountPart(Base):
    """Part of a parted account's balance (escrow's: one per job with money held; revenue's: shards).

    A part is its own row so that transactions moving money through escrow or
    revenue at once lock different rows; the account's balance is its own
    column plus the sum of its parts (``Account.balance``), and ``ledger.check``
    proves both equal what the transfers say.
    """

    __tablename__ = "account_parts"
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_nonnegative"),)

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    #: Escrow: the job's id; revenue: ``shard-<n>``.
    part: Mapped[str] = mapped_column(String(64), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger)

    def __repr__(self) -> str:
        return f"AccountPart(account_id={self.account_id!r}, part={self.part!r}, balance={self.balance!r})"


class Account(Base):
    """A holder of money: a requester (``user``) or one of the service's own."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("kind IN ('user', 'system')", name="kind"),
        # Only the world may go negative: escrow and revenue hold real money. Escrow's own column
        # is an offset to its parts (0 when the books balance), checked by ledger.check, not here.
        CheckConstraint(
            f"balance >= 0 OR (kind = 'system' AND name IN ('{WORLD}', '{ESCROW}'))", name="balance_nonnegative"
        ),
        CheckConstraint("kind = 'system' OR api_key_hash IS NOT NULL", name="user_has_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    #: sha256 hex of the API key; the key itself is shown once and never stored.
    api_key_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    #: Signs webhooks to this requester. It must be read back to sign, so it is sealed
    #: (``router.core.sealing``) rather than hashed; deferred: read only to sign.
    webhook_secret: Mapped[str] = mapped_column(SealedText(), deferred=True)
    #: The account's own column: the whole balance of a requester and of the world; escrow's and
    #: revenue's money is (mostly) in their parts. Written only by ``router.core.ledger``.
    own_balance: Mapped[int] = mapped_column("balance", BigInteger, server_default=text("0"))
    #: Smallest money unit: the own column plus the account's parts. Kept equal to credits minus
    #: debits (see ledger.check). Read-only: the ledger writes the column or a part.
    balance: Mapped[int] = column_property(
        own_balance
        + select(cast(func.coalesce(func.sum(AccountPart.balance), 0), BigInteger))
        .where(AccountPart.account_id == id)
        .correlate_except(AccountPart)
        .scalar_subquery()
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP")
    )

    def __repr__(self) -> str:
        return f"Account(id={self.id!r}, name={self.name!r}, kind={self.kind!r})"


class AccountLimits(Base):
    """An account's own fair-share limits, set by the admin; a NULL column takes the setting's default.

    Kept apart from ``accounts`` so the ledger's hottest rows are not
    rewritten when an admin changes a limit.
    """

    __tablename__ = "account_limits"
    __table_args__ = (
        CheckConstraint(
            "(max_queued IS NULL OR max_queued >= 1) AND (max_in_flight IS NULL OR max_in_flight >= 1) "
            "AND (requests_per_minute IS NULL OR requests_per_minute >= 0) "
            "AND (tokens_per_minute IS NULL OR tokens_per_minute >= 0) "
            "AND (max_request_tokens IS NULL OR max_request_tokens >= 1)",
            name="in_range",
        ),
    )

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    #: Jobs waiting in the queue at once.
    max_queued: Mapped[int | None] = mapped_column(Integer)
    #: Jobs running at once over the whole herd.
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    #: Admitted requests in any 60 s; 0 = no limit.
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    #: Admitted tokens (prompt + n × max_tokens) in any 60 s; 0 = no limit.
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    #: Largest n × max_tokens of one request.
    max_request_tokens: Mapped[int | None] = mapped_column(Integer)

    def __repr__(self) -> str:
        return f"AccountLimits(account_id={self.account_id!r})"


class Transfer(Base):
    """One double-entry movement of ``amount`` from the debit to the credit account."""

    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{kind}'" for kind in TRANSFER_KINDS) + ")", name="kind"
        ),
        CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
    )

    # SQLite only autoincrements an INTEGER primary key; elsewhere 2**31 transfers is reachable.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    debit_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    credit_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    #: The job a hold, capture, release or earn belongs to; no FK, jobs come later.
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP")
    )

    def __repr__(self) -> str:
        return (
            f"Transfer(id={self.id!r}, kind={self.kind!r}, amount={self.amount!r}, "
            f"{self.debit_account_id!r}->{self.credit_account_id!r}, job_id={self.job_id!r})"
        )


class Operator(Base):
    """Someone who runs workers and earns a share of what their jobs are charged.

    An operator is an ordinary requester account (it may buy inference with its
    API key) plus the Ed25519 public key its workers' attestations verify with.
    """

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: What workers sign as ``operator``; the name of its account too.
    name: Mapped[str] = mapped_column(String(200), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), unique=True)
    #: Raw Ed25519 public key, base64 (44 characters).
    public_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP")
    )

    def __repr__(self) -> str:
        return f"Operator(id={self.id!r}, name={self.name!r}, account_id={self.account_id!r})"


class BrokerUser(Base):
    """A Redis ACL user given to an operator's workers or a requester's client (``router.core.broker_access``).

    Only the password's sha256 is kept, which Redis accepts as is: the herder
    re-creates every active user from here after a Redis restart.
    """

    __tablename__ = "broker_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The Redis user name: ``<role>.<owner>``.
    name: Mapped[str] = mapped_column(String(220), unique=True)
    #: ``operator`` or ``client``.
    role: Mapped[str] = mapped_column(String(20))
    #: The operator's (or requester account's) name.
    owner: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    #: An operator's models, comma-separated; empty: every model.
    models: Mapped[str] = mapped_column(Text, default="")
    password_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP")
    )
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def model_names(self) -> list[str]:
        return [m for m in (self.models or "").split(",") if m]

    def __repr__(self) -> str:
        return f"BrokerUser(name={self.name!r}, role={self.role!r}, revoked_at={self.revoked_at!r})"


#: Job states. ``queued`` and ``running`` are open; the rest are final.
QUEUED, RUNNING, DONE, FAILED, EXPIRED, CANCELLED = (
    "queued", "running", "done", "failed", "expired", "cancelled",
)
OPEN_STATES = (QUEUED, RUNNING)
FINAL_STATES = (DONE, FAILED, EXPIRED, CANCELLED)


class JobRow(Base):
    """One admitted request, from its hold to the end of its life.

    Times are Unix seconds (floats): the queue's ordering key is computed
    from them, and they are compared with worker clocks in envelopes.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "state IN ('queued', 'running', 'done', 'failed', 'expired', 'cancelled')", name="state"
        ),
        CheckConstraint("offered >= quote AND quote > 0", name="offer_covers_quote"),
        UniqueConstraint("account_id", "reference", name="uq_jobs_account_id_reference"),
        # The fee market: per model, best effective bid first, then arrival.
        Index("ix_jobs_queue", "model", "state", "priority", "seq"),
        # Fair shares: an account's queued and running jobs, counted at every admission and claim.
        Index("ix_jobs_account_state", "account_id", "state"),
        # The retention task's scan: jobs whose text is kept, oldest finished first.
        Index("ix_jobs_text_erased_at_finished_at", "text_erased_at", "finished_at"),
        # The tick's look for undelivered responses: only the few due rows are in it.
        Index("ix_jobs_delivery_due", "finished_at", sqlite_where=text("delivery_due"),
              postgresql_where=text("delivery_due")),
    )

    # Arrival order; the public id is ``id``.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    reference: Mapped[str | None] = mapped_column(String(200))
    #: sha256 of the request's parameters: a reused reference must match it.
    request_hash: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    #: The generation parameters (prompt or messages, stop, grammar, sampling) as JSON.
    request: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    quote: Mapped[int] = mapped_column(BigInteger)
    #: The prices the quote was made at: a price change never reprices a
    #: quoted job. NULL only for jobs admitted before migration 0003.
    base_fee: Mapped[int | None] = mapped_column(BigInteger)
    fee_per_token: Mapped[int | None] = mapped_column(BigInteger)
    #: Fee per prompt token a worker reused from its cache, as quoted. NULL only
    #: for jobs admitted before migration 0004: charged at their ``fee_per_token``.
    fee_per_cached_token: Mapped[int | None] = mapped_column(BigInteger)
    #: Completions asked for; the quote covers ``n × max_tokens``.
    n: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    #: What is held for this job: the requester's offer (raised bids add to it).
    offered: Mapped[int] = mapped_column(BigInteger)
    #: offered / quote in millionths: the bid of the fee market.
    bid_ppm: Mapped[int] = mapped_column(BigInteger)
    #: Ordering key, higher first: bid + aging × (−created_at); time-invariant.
    priority: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    #: Celery task id of the current attempt; a result must name it.
    task_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float | None] = mapped_column(Float)
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    lease_until: Mapped[float | None] = mapped_column(Float, index=True)
    finished_at: Mapped[float | None] = mapped_column(Float)
    #: The sum of every completion's generated tokens, as its worker signed them.
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    #: Every completion (``llama_tasks.result.Choice``: index, text, finish reason, signed
    #: token count, logprobs) as a JSON list, choice 0 first; NULL for jobs that did not complete.
    choices: Mapped[str | None] = mapped_column(Text)
    #: Prompt tokens the worker reused from its prompt cache (clamped to ``[0, prompt_tokens]``).
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    charged: Mapped[int | None] = mapped_column(BigInteger)
    refunded: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    #: The operator whose worker produced the settled result, as its signed attestation
    #: proved; NULL: no verified operator, the whole charge went to the house.
    operator: Mapped[str | None] = mapped_column(String(200))
    #: sha256 of the model file the settled result was produced with, as the worker reported it.
    model_id: Mapped[str | None] = mapped_column(String(64))
    #: Worker timings of the completed attempt, as JSON.
    timings: Mapped[str | None] = mapped_column(Text)
    #: Channels: a Celery task name and queue of the requester, and/or a webhook URL.
    callback_task: Mapped[str | None] = mapped_column(String(200))
    callback_queue: Mapped[str | None] = mapped_column(String(200))
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    #: Channels delivered to, comma-separated, recorded once the delivery has happened.
    delivered: Mapped[str] = mapped_column(String(64), server_default=text("''"))
    #: The job has ended and its response is not yet known to be delivered
    #: (``router.core.forwarding``): the tick delivers it again if its deliverer died.
    delivery_due: Mapped[bool] = mapped_column(Boolean, server_default=false())
    #: When the retention task erased the job's text (``router.core.retention``): the
    #: request's prompt, messages, stop strings and grammar, the choices' text and
    #: logprobs. NULL while the text is kept.
    text_erased_at: Mapped[float | None] = mapped_column(Float)

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES


class ModelSlot(Base):
    """One of a model's slots in the herd, as PostgreSQL claims take them (``router.core.queue``).

    A claim locks the free slots it fills ``FOR UPDATE SKIP LOCKED``, so
    claims of one model wait only for the rows they both want. A slot is free
    when it holds no attempt or the attempt it holds is no longer running (so
    nothing has to free it when the attempt ends). Slots ``no >= `` the herd's
    current slots for the model are not used. SQLite counts running jobs
    instead (one writer at a time).
    """

    __tablename__ = "model_slots"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    no: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The running job (``jobs.seq``) and attempt that took the slot last; NULL: never taken.
    job_seq: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int | None] = mapped_column(Integer)

    def __repr__(self) -> str:
        return f"ModelSlot(model={self.model!r}, no={self.no!r}, job_seq={self.job_seq!r}, attempt={self.attempt!r})"


def width(column: str) -> int:
    """Characters a ``jobs`` string column holds: PostgreSQL refuses longer values."""
    length = getattr(JobRow.__table__.c[column].type, "length", None)
    assert isinstance(length, int), f"jobs.{column} has no width"
    return length
