"""Operators: accounts that run workers and earn a share of their jobs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10

An operator is a requester account plus the Ed25519 public key its workers
sign their results with. Settling a result its operator's key attests moves
that operator's share of the charge from the job's hold to the operator
(transfer kind ``earn``); operators are paid out to the world as ``payout``.
``jobs.operator`` names the verified operator of a settled job; jobs settled
before this revision keep NULL (all to the house).

The ``transfers.kind`` CHECK constraint is replaced, which SQLite can do only
by copying the table (batch mode); its other constraints are copied with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = ("deposit", "withdraw", "hold", "capture", "release")
NEW_KINDS = (*OLD_KINDS, "earn", "payout")


def _kinds(kinds: Sequence[str]) -> str:
    return "kind IN (" + ", ".join(f"'{kind}'" for kind in kinds) + ")"


def _replace_kind_check(kinds: Sequence[str]) -> None:
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_transfers_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_transfers_kind"), _kinds(kinds))


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operators")),
        sa.UniqueConstraint("name", name=op.f("uq_operators_name")),
        sa.UniqueConstraint("account_id", name=op.f("uq_operators_account_id")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_operators_account_id_accounts")
        ),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("operator", sa.String(200), nullable=True))
    _replace_kind_check(NEW_KINDS)


def downgrade() -> None:
    # Refused by the old constraint while any earn or payout transfer exists:
    # going back would have to forget where that money went.
    _replace_kind_check(OLD_KINDS)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("operator")
    op.drop_table("operators")
