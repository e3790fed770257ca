"""Tables of the herder's database: accounts and the transfers between them.

Later tables (jobs) join the same ``Base.metadata``; migrations in
``router/migrations/versions`` create them, never ``metadata.create_all``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: The outside world: deposits come from it and withdrawals go to it, so its
#: balance is minus the money inside the service. The only account that may
#: go negative.
WORLD = "world"
#: Money held for admitted jobs until they settle.
ESCROW = "escrow"
#: Fees earned by the service.
REVENUE = "revenue"
SYSTEM_ACCOUNTS = (WORLD, ESCROW, REVENUE)

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


class Account(Base):
    """A holder of money: a requester (``user``) or one of the service's own."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("kind IN ('user', 'system')", name="kind"),
        # Only the world may go negative: escrow and revenue hold real money.
        CheckConstraint(
            f"balance >= 0 OR (kind = 'system' AND name = '{WORLD}')", name="balance_nonnegative"
        ),
        CheckConstraint("kind = 'system' OR api_key_hash IS NOT NULL", name="user_has_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    #: sha256 hex of the API key; the key itself is shown once and never stored.
    api_key_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    #: Signs webhooks to this requester; must be readable to sign, so stored as is.
    webhook_secret: Mapped[str] = mapped_column(String(64))
    #: Smallest money unit. Kept equal to credits minus debits (see ledger.check).
    balance: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP")
    )

    def __repr__(self) -> str:
        return f"Account(id={self.id!r}, name={self.name!r}, kind={self.kind!r})"


class Transfer(Base):
    """One double-entry movement of ``amount`` from the debit to the credit account."""

    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "kind IN ('deposit', 'withdraw', 'hold', 'capture', 'release')", name="kind"
        ),
        CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
    )

    # SQLite only autoincrements an INTEGER primary key; elsewhere 2**31 transfers is reachable.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    debit_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    credit_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    #: The job a hold, capture or release belongs to; no FK, jobs come later.
    job_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP")
    )

    def __repr__(self) -> str:
        return (
            f"Transfer(id={self.id!r}, kind={self.kind!r}, amount={self.amount!r}, "
            f"{self.debit_account_id!r}->{self.credit_account_id!r}, job_id={self.job_id!r})"
        )
