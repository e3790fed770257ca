"""Fair shares: an account's own limits, and an index to count its open jobs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

``account_limits`` holds the limits the admin set for one account
(``llamas accounts limits``); a missing row or a NULL column means the
setting's default. ``ix_jobs_account_state`` serves the per-account counts
of queued and running jobs that admission and dispatch make.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

IN_RANGE = (
    "(max_queued IS NULL OR max_queued >= 1) AND (max_in_flight IS NULL OR max_in_flight >= 1) "
    "AND (requests_per_minute IS NULL OR requests_per_minute >= 0) "
    "AND (tokens_per_minute IS NULL OR tokens_per_minute >= 0) "
    "AND (max_request_tokens IS NULL OR max_request_tokens >= 1)"
)


def upgrade() -> None:
    op.create_table(
        "account_limits",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("max_queued", sa.Integer(), nullable=True),
        sa.Column("max_in_flight", sa.Integer(), nullable=True),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.BigInteger(), nullable=True),
        sa.Column("max_request_tokens", sa.Integer(), nullable=True),
        sa.CheckConstraint(IN_RANGE, name=op.f("ck_account_limits_in_range")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"],
                                name=op.f("fk_account_limits_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_limits")),
    )
    op.create_index("ix_jobs_account_state", "jobs", ["account_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_account_state", table_name="jobs")
    op.drop_table("account_limits")
