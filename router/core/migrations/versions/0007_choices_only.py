"""A job's completions are kept once: in ``jobs.choices``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

``jobs.result_text`` and ``jobs.finish_reason`` repeated choice 0 of
``jobs.choices``. Jobs settled before revision 0004 had only those two
columns: their single completion is written into ``choices`` first (with the
job's ``completion_tokens`` and no logprobs), so nothing reads the old shape
any more. The downgrade writes choice 0 back into the two columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

jobs = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("result_text", sa.Text),
    sa.column("finish_reason", sa.String),
    sa.column("completion_tokens", sa.Integer),
    sa.column("choices", sa.Text),
)


def upgrade() -> None:
    bind = op.get_bind()
    old = bind.execute(
        sa.select(jobs.c.id, jobs.c.result_text, jobs.c.finish_reason, jobs.c.completion_tokens)
        .where(jobs.c.choices.is_(None), jobs.c.result_text.is_not(None))
    ).all()
    for job_id, text, finish_reason, completion_tokens in old:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason,
                  "completion_tokens": completion_tokens or 0, "logprobs": None}
        bind.execute(jobs.update().where(jobs.c.id == job_id).values(choices=json.dumps([choice])))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("result_text")
        batch_op.drop_column("finish_reason")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_text", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("finish_reason", sa.String(32), nullable=True))
    bind = op.get_bind()
    for job_id, choices in bind.execute(sa.select(jobs.c.id, jobs.c.choices).where(jobs.c.choices.is_not(None))).all():
        first = json.loads(choices)[0]
        bind.execute(jobs.update().where(jobs.c.id == job_id)
                     .values(result_text=first["text"], finish_reason=first["finish_reason"]))
