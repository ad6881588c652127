"""``queued`` as a job status: the coordinator service's job queue.

A coordinator started as a service runs jobs one after another; a submitted
job waits as ``queued`` until the jobs before it end (see
:meth:`fedvault.coordinator.store.RoundStore.job_queue`). The queue's order is
``jobs.updated_at``, so no column is added: only the CHECK constraint
``ck_jobs_status`` changes.

On SQLite, changing a CHECK constraint recreates the table (batch mode); the
store runs migrations with foreign-key enforcement off and checks the foreign
keys before it commits.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_OLD_JOB_STATUSES = "status IN ('running', 'paused', 'finished', 'failed', 'stopped')"
_NEW_JOB_STATUSES = "status IN ('queued', 'running', 'paused', 'finished', 'failed', 'stopped')"


def _clear_batch_leftover() -> None:
    """Drop the empty copy a failed earlier hand-run left behind on SQLite (see 0004)."""
    if op.get_context().dialect.name == "sqlite":
        op.execute(sa.text("DROP TABLE IF EXISTS _alembic_tmp_jobs"))


def _check(statuses: str) -> None:
    _clear_batch_leftover()
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_status"), sa.text(statuses))


def upgrade() -> None:
    """Allow ``queued``."""
    _check(_NEW_JOB_STATUSES)


def downgrade() -> None:
    """Refused while a job is queued: 0004 cannot describe it."""
    if op.get_bind().scalar(sa.text("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")):
        raise RuntimeError(
            "a job is queued; let it run or stop it (`fedvault job stop`) before downgrading "
            "to 0004"
        )
    _check(_OLD_JOB_STATUSES)
