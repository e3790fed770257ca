"""Model slots: PostgreSQL claims take free slots as rows, without a lock per model.

Revision ID: 0013
Revises: 0012
Create Date: 2027-02-10

One row per slot of a model (``router.core.queue``): a claim locks the free
slots it fills ``FOR UPDATE SKIP LOCKED`` and writes the attempt it starts
into each, so claims of one model never wait on each other and never give a
model more running sequences than it has slots. Rows are made as the herd's
slots are first seen; SQLite keeps counting running jobs instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_slots",
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("no", sa.Integer(), nullable=False),
        sa.Column("job_seq", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("model", "no", name=op.f("pk_model_slots")),
    )


def downgrade() -> None:
    op.drop_table("model_slots")
