"""Jobs: every admitted request, its bid, its attempts and how it ended.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('jobs',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('reference', sa.String(length=200), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('request', sa.Text(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('max_tokens', sa.Integer(), nullable=False),
    sa.Column('quote', sa.BigInteger(), nullable=False),
    sa.Column('offered', sa.BigInteger(), nullable=False),
    sa.Column('bid_ppm', sa.BigInteger(), nullable=False),
    sa.Column('priority', sa.Float(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('task_id', sa.String(length=64), nullable=True),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('deadline_at', sa.Float(), nullable=True),
    sa.Column('dispatched_at', sa.Float(), nullable=True),
    sa.Column('lease_until', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('result_text', sa.Text(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('charged', sa.BigInteger(), nullable=True),
    sa.Column('refunded', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('timings', sa.Text(), nullable=True),
    sa.Column('callback_task', sa.String(length=200), nullable=True),
    sa.Column('callback_queue', sa.String(length=200), nullable=True),
    sa.Column('webhook_url', sa.String(length=2000), nullable=True),
    sa.Column('delivered', sa.String(length=64), server_default=sa.text("''"), nullable=False),
    sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed', 'expired', 'cancelled')", name=op.f('ck_jobs_state')),
    sa.CheckConstraint('offered >= quote AND quote > 0', name=op.f('ck_jobs_offer_covers_quote')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_jobs_account_id_accounts')),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_jobs')),
    sa.UniqueConstraint('account_id', 'reference', name='uq_jobs_account_id_reference'),
    sa.UniqueConstraint('id', name=op.f('uq_jobs_id')),
    sa.UniqueConstraint('task_id', name=op.f('uq_jobs_task_id'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_account_id'), ['account_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_lease_until'), ['lease_until'], unique=False)
        batch_op.create_index('ix_jobs_queue', ['model', 'state', 'priority', 'seq'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_state'), ['state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_state'))
        batch_op.drop_index('ix_jobs_queue')
        batch_op.drop_index(batch_op.f('ix_jobs_lease_until'))
        batch_op.drop_index(batch_op.f('ix_jobs_account_id'))

    op.drop_table('jobs')
