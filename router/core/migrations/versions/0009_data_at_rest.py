"""Data at rest: webhook secrets sealed, and a job's text erased after its retention.

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-10

``accounts.webhook_secret`` was kept as is, so a copy of the ledger file
signed webhooks for anyone. Each one is now sealed with AES-256-GCM under the
secrets key (``router.core.sealing``: ``LLAMAS_SECRETS_KEY`` or
``<home>/secrets.key``), which is never in the database; the column widens
to hold the ciphertext. ``jobs.text_erased_at`` records when the retention task erased a
job's prompt and completion text (``router.core.retention``), indexed with
``finished_at`` for its scan. The downgrade opens the secrets again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

from router.core import sealing

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

accounts = sa.table("accounts", sa.column("id", sa.Integer), sa.column("webhook_secret", sa.String))
INDEX = "ix_jobs_text_erased_at_finished_at"


def _rewrite_secrets(change: Callable[[str], str | None]) -> None:
    bind = op.get_bind()
    for account_id, secret in bind.execute(sa.select(accounts.c.id, accounts.c.webhook_secret)).all():
        new = change(secret)
        if new is not None:
            bind.execute(accounts.update().where(accounts.c.id == account_id).values(webhook_secret=new))


def _width(chars: int) -> None:
    """Give ``accounts.webhook_secret`` room for ``chars`` characters."""
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("accounts", "webhook_secret", type_=sa.String(chars), existing_nullable=False)
        return
    # SQLite alters a column's type only by rebuilding the table, and rebuilding
    # ``accounts`` (which every transfer and job references) would break the
    # foreign keys that the ledger's connections enforce. A new column takes
    # the values instead (SQLite 3.35+ drops and renames columns in place).
    op.execute(f"ALTER TABLE accounts ADD COLUMN webhook_secret_new VARCHAR({chars}) NOT NULL DEFAULT ''")
    op.execute("UPDATE accounts SET webhook_secret_new = webhook_secret")
    op.execute("ALTER TABLE accounts DROP COLUMN webhook_secret")
    op.execute("ALTER TABLE accounts RENAME COLUMN webhook_secret_new TO webhook_secret")


def upgrade() -> None:
    _width(sealing.SEALED_CHARS)
    box = sealing.default_box()
    _rewrite_secrets(lambda secret: None if sealing.is_sealed(secret) else box.seal(secret))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("text_erased_at", sa.Float(), nullable=True))
        batch_op.create_index(INDEX, ["text_erased_at", "finished_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(INDEX)
        batch_op.drop_column("text_erased_at")
    box = sealing.default_box()
    _rewrite_secrets(lambda secret: box.open(secret) if sealing.is_sealed(secret) else None)
    _width(64)
