"""Encryption at rest, and ``paused`` as a job status.

* ``models.at_rest`` and ``privacy_ledger.at_rest`` say how each blob is
  stored: ``none`` (as the coordinator got it: BFV ciphertext, or plaintext
  in a store opened without a key) or ``aes-256-gcm`` (sealed with the
  coordinator kit's at-rest key, see :mod:`fedvault.coordinator.at_rest`).
  Every row written before this revision was stored as is, hence the server
  default ``none``: a later opener with a key must not try to open them.
* ``store_meta`` holds store-wide facts, first of all the id of the at-rest
  key that sealed this store, so a wrong key is refused when the store opens
  instead of on the first model read.
* ``jobs.status`` may be ``paused``, so the operator API can record a pause
  as a status instead of inferring it from the audit trail.

On SQLite, changing a CHECK constraint recreates the table (batch mode); the
store runs migrations with foreign-key enforcement off and checks the foreign
keys before it commits.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_OLD_JOB_STATUSES = "status IN ('running', 'finished', 'failed', 'stopped')"
_NEW_JOB_STATUSES = "status IN ('running', 'paused', 'finished', 'failed', 'stopped')"
_AT_REST = "at_rest IN ('none', 'aes-256-gcm')"
_SEALED_TABLES = ("models", "privacy_ledger")


def upgrade() -> None:
    """Add the at-rest flags and ``store_meta``; allow ``paused``."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_status"), sa.text(_NEW_JOB_STATUSES))
    for table in _SEALED_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("at_rest", sa.String(16), nullable=False, server_default="none")
            )
            batch.create_check_constraint(op.f(f"ck_{table}_at_rest"), sa.text(_AT_REST))
    op.create_table(
        "store_meta",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_store_meta")),
        sa.UniqueConstraint("name", name=op.f("uq_store_meta_name")),
    )


def downgrade() -> None:
    """Refused while any row is sealed or any job paused: that would lose data."""
    conn = op.get_bind()
    for table in _SEALED_TABLES:
        sealed = conn.scalar(sa.text(f"SELECT COUNT(*) FROM {table} WHERE at_rest != 'none'"))
        if sealed:
            raise RuntimeError(
                f"{sealed} row(s) of {table} are encrypted at rest; revision 0001 cannot "
                "describe them. Keep this revision, or restore a backup taken before it"
            )
    if conn.scalar(sa.text("SELECT COUNT(*) FROM jobs WHERE status = 'paused'")):
        raise RuntimeError("a job is paused; resume or stop it before downgrading to 0001")
    op.drop_table("store_meta")
    for table in reversed(_SEALED_TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_at_rest"), type_="check")
            batch.drop_column("at_rest")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_status"), type_="check")
        batch.create_check_constraint(op.f("ck_jobs_status"), sa.text(_OLD_JOB_STATUSES))
