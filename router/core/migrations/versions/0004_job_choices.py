"""Jobs with several completions, logprobs, and cached prompt tokens.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

A job may ask for ``n`` completions (its quote covers each), returns them all
with their log probabilities, and pays less for prompt tokens a worker reused
from its prompt cache, at the cached-token fee in force when it was quoted.
Jobs admitted before this revision have ``n`` 1 and a NULL cached-token fee
(charged at their fee per token); jobs finished before it have no choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fee_per_cached_token", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("n", sa.Integer(), server_default=sa.text("1"), nullable=False))
        batch_op.add_column(sa.Column("choices", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("cached_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("cached_tokens")
        batch_op.drop_column("choices")
        batch_op.drop_column("n")
        batch_op.drop_column("fee_per_cached_token")
