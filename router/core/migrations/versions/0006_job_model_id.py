"""The model id a job's result was produced with.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-11

``jobs.model_id`` keeps the sha256 of the model file the worker reported in
its result (the registry id it verified its file against at start). A receipt
signs this, not the registry as it is when the receipt is asked for: a model
re-registered under the same name later does not change what older jobs ran
on. Jobs settled before this revision keep NULL.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("model_id")
