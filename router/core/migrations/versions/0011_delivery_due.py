"""Delivery due: a job's response is marked delivered only after it was delivered.

Revision ID: 0011
Revises: 0010
Create Date: 2027-02-03

``jobs.delivery_due`` is set by the transaction that ends a job and cleared
once its channels have been delivered to (``router.core.forwarding``); the
tick delivers again whatever is still due a few seconds later, so a herder
that dies between the two loses no answer. Jobs that ended before this
migration were delivered under the old rule (marked, then sent): none is due.
A partial index holds only the due rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_jobs_delivery_due"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delivery_due", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_index(INDEX, "jobs", ["finished_at"], sqlite_where=sa.text("delivery_due"),
                    postgresql_where=sa.text("delivery_due"))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("delivery_due")
