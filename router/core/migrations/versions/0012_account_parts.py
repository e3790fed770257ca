"""Account parts: escrow held per job, revenue in shards, so no row is written by every transaction.

Revision ID: 0012
Revises: 0011
Create Date: 2027-02-10

Until now every hold, capture, release and earn updated escrow's one row
(and every capture revenue's), so all admissions and settlements waited on
each other. ``account_parts`` holds escrow's money one row per job that
holds any (the row is the job's hold) and revenue's in shards; an
account's balance is its own column plus its parts. The upgrade moves every
open hold from escrow's column into its job's part, leaving the column at 0;
revenue's column keeps what was earned so far.

Escrow's own column is now an offset that ``ledger.check`` requires to be 0,
so the database's check no longer refuses it below zero (a part is never
negative: its own check). On SQLite the check is rewritten in the schema
text as SQLite's ALTER TABLE documentation describes for dropping or
loosening a CHECK (recreating ``accounts`` would break the foreign keys
that point at it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECK = "ck_accounts_balance_nonnegative"
#: ``router.core.models.REVENUE_SHARDS`` when this migration was written.
REVENUE_SHARDS = 256
OLD = "balance >= 0 OR (kind = 'system' AND name = 'world')"
NEW = "balance >= 0 OR (kind = 'system' AND name IN ('world', 'escrow'))"


def upgrade() -> None:
    op.create_table(
        "account_parts",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("part", sa.String(64), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("balance >= 0", name=op.f("ck_account_parts_balance_nonnegative")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_account_parts_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", "part", name=op.f("pk_account_parts")),
    )
    _set_check(OLD, NEW)
    # Every job's open hold becomes its part of escrow; escrow's column gives up exactly that.
    op.execute(
        """
        INSERT INTO account_parts (account_id, part, balance)
        SELECT e.id, t.job_id, SUM(CASE WHEN t.kind = 'hold' THEN t.amount ELSE -t.amount END)
        FROM transfers t, accounts e
        WHERE e.name = 'escrow' AND e.kind = 'system' AND t.job_id IS NOT NULL
          AND t.kind IN ('hold', 'capture', 'release', 'earn')
        GROUP BY e.id, t.job_id
        HAVING SUM(CASE WHEN t.kind = 'hold' THEN t.amount ELSE -t.amount END) > 0
        """
    )
    # Revenue's shards exist from the start: two of the first settlements never wait for one another to
    # create the same shard (the insert of a key another transaction is inserting waits for its commit).
    op.execute(
        f"""
        INSERT INTO account_parts (account_id, part, balance)
        SELECT r.id, 'shard-' || n.n, 0 FROM accounts r, ({_numbers(REVENUE_SHARDS)}) AS n
        WHERE r.name = 'revenue' AND r.kind = 'system'
        """
    )
    op.execute(
        """
        UPDATE accounts SET balance = balance - COALESCE(
            (SELECT SUM(p.balance) FROM account_parts p WHERE p.account_id = accounts.id), 0)
        WHERE name = 'escrow' AND kind = 'system'
        """
    )


def downgrade() -> None:
    op.execute(
        """
        UPDATE accounts SET balance = balance + COALESCE(
            (SELECT SUM(p.balance) FROM account_parts p WHERE p.account_id = accounts.id), 0)
        WHERE kind = 'system'
        """
    )
    op.drop_table("account_parts")
    _set_check(NEW, OLD)


def _numbers(count: int) -> str:
    """SQL rows 0 … count − 1, one column, on both backends."""
    return " UNION ALL ".join(f"SELECT {n} AS n" for n in range(count))


def _set_check(old: str, new: str) -> None:
    """Replace the accounts' balance check ``old`` by ``new``."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint(op.f(CHECK), "accounts", type_="check")
        op.create_check_constraint(op.f(CHECK), "accounts", new)
        return
    sql = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'accounts'").scalar_one()
    if old not in sql:
        raise RuntimeError(f"the accounts table's schema lacks the check {old!r}")
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar_one()
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        bind.exec_driver_sql(
            "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'accounts'", (sql.replace(old, new),)
        )
        bind.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema = OFF")
