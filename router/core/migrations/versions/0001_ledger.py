"""The ledger: accounts, transfers, and the three system accounts.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Constraint names are spelled out as ``router.core.models.NAMING_CONVENTION``
renders them, so later migrations can alter them by name on both backends.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Only the external world may go negative; escrow and revenue hold real money.
SYSTEM_ACCOUNTS = ("world", "escrow", "revenue")


def upgrade() -> None:
    accounts = op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("api_key_hash", sa.String(64), nullable=True),
        sa.Column("webhook_secret", sa.String(64), nullable=False),
        sa.Column("balance", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
        sa.UniqueConstraint("api_key_hash", name=op.f("uq_accounts_api_key_hash")),
        sa.CheckConstraint("kind IN ('user', 'system')", name=op.f("ck_accounts_kind")),
        sa.CheckConstraint(
            "balance >= 0 OR (kind = 'system' AND name = 'world')",
            name=op.f("ck_accounts_balance_nonnegative"),
        ),
        sa.CheckConstraint(
            "kind = 'system' OR api_key_hash IS NOT NULL", name=op.f("ck_accounts_user_has_key")
        ),
    )
    op.create_table(
        "transfers",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("debit_account_id", sa.Integer(), nullable=False),
        sa.Column("credit_account_id", sa.Integer(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transfers")),
        sa.ForeignKeyConstraint(
            ["debit_account_id"],
            ["accounts.id"],
            name=op.f("fk_transfers_debit_account_id_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["credit_account_id"],
            ["accounts.id"],
            name=op.f("fk_transfers_credit_account_id_accounts"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_transfers_amount_positive")),
        sa.CheckConstraint(
            "kind IN ('deposit', 'withdraw', 'hold', 'capture', 'release')",
            name=op.f("ck_transfers_kind"),
        ),
        sa.CheckConstraint(
            "debit_account_id <> credit_account_id", name=op.f("ck_transfers_distinct_accounts")
        ),
    )
    op.create_index(op.f("ix_transfers_job_id"), "transfers", ["job_id"])
    op.create_index(op.f("ix_transfers_debit_account_id"), "transfers", ["debit_account_id"])
    op.create_index(op.f("ix_transfers_credit_account_id"), "transfers", ["credit_account_id"])
    op.bulk_insert(
        accounts,
        [
            {
                "name": name,
                "kind": "system",
                "api_key_hash": None,
                "webhook_secret": secrets.token_hex(32),
                "balance": 0,
            }
            for name in SYSTEM_ACCOUNTS
        ],
    )


def downgrade() -> None:
    op.drop_table("transfers")
    op.drop_table("accounts")
