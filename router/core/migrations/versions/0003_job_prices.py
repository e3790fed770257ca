"""Jobs keep the prices they were quoted at.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

Settlement charged a finished job at the prices of the moment it finished,
so a price change repriced every job already quoted. Jobs admitted before
this revision keep NULL and are charged at the current prices, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_fee", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("fee_per_token", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("fee_per_token")
        batch_op.drop_column("base_fee")
