"""Broker users: the Redis ACL users given to operators' workers and requesters' clients.

Revision ID: 0010
Revises: 0009
Create Date: 2027-01-20

One row per credential (``router.core.broker_access``): its Redis user name,
role, whose it is, an operator's models, the sha256 of its password (the
password itself is shown once and kept nowhere), and when it was issued and
revoked. The herder re-applies the active ones to Redis at start and every minute.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "broker_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(220), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("password_sha256", sa.String(64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_broker_users")),
        sa.UniqueConstraint("name", name=op.f("uq_broker_users_name")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_broker_users_account_id_accounts")
        ),
    )
    op.create_index(op.f("ix_broker_users_account_id"), "broker_users", ["account_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_broker_users_account_id"), table_name="broker_users")
    op.drop_table("broker_users")
