"""The round store's first schema (as ``metadata.create_all`` made it before migrations).

A store created by ``create_all`` has no ``alembic_version`` table; the store
stamps it as this revision and upgrades it from here. So this revision must
stay byte-for-byte the schema of that era: never edit it, add a revision.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the six tables with the names the naming convention gave them."""
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.CheckConstraint(
            "status IN ('running', 'finished', 'failed', 'stopped')", name=op.f("ck_jobs_status")
        ),
        sa.UniqueConstraint("name", name=op.f("uq_jobs_name")),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_audit_events_job_id_jobs")),
        sa.UniqueConstraint("prev_hash", name=op.f("uq_audit_events_prev_hash")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_events_hash")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_audit_events_job_id"), "audit_events", ["job_id"])
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("total_weight", sa.Float(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("job_id", "round", name=op.f("uq_models_job_id_round")),
        sa.CheckConstraint("kind IN ('ckks', 'plain')", name=op.f("ck_models_kind")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_models_job_id_jobs")),
    )
    op.create_table(
        "privacy_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=True),
        sa.Column("noise_multiplier", sa.Float(), nullable=True),
        sa.Column("sample_rate", sa.Float(), nullable=True),
        sa.Column("steps", sa.BigInteger(), nullable=True),
        sa.Column("accountant", sa.String(32), nullable=True),
        sa.Column("accountant_state", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_ledger")),
        sa.UniqueConstraint(
            "job_id", "hospital", "round", name=op.f("uq_privacy_ledger_job_id_hospital_round")
        ),
        sa.CheckConstraint("epsilon >= 0", name=op.f("ck_privacy_ledger_epsilon")),
        sa.CheckConstraint(
            "delta IS NULL OR (delta >= 0 AND delta < 1)", name=op.f("ck_privacy_ledger_delta")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_privacy_ledger_job_id_jobs")
        ),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("committed_at", _TS, nullable=True),
        sa.Column("total_weight", sa.Float(), nullable=True),
        sa.Column("num_participants", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("eval_accuracy", sa.Float(), nullable=True),
        sa.Column("eval_loss", sa.Float(), nullable=True),
        sa.Column("evaluated_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint(
            "job_id", "number", "attempt", name=op.f("uq_rounds_job_id_number_attempt")
        ),
        sa.CheckConstraint("status IN ('committed', 'failed')", name=op.f("ck_rounds_status")),
        sa.CheckConstraint("number >= 1", name=op.f("ck_rounds_number")),
        sa.CheckConstraint("attempt >= 1", name=op.f("ck_rounds_attempt")),
        sa.CheckConstraint("num_participants >= 0", name=op.f("ck_rounds_num_participants")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_rounds_job_id_jobs")),
    )
    # Failed attempts may repeat; a committed round exists at most once.
    op.create_index(
        op.f("uq_rounds_committed"),
        "rounds",
        ["job_id", "number"],
        unique=True,
        sqlite_where=sa.text("status = 'committed'"),
        postgresql_where=sa.text("status = 'committed'"),
    )
    op.create_table(
        "participations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("hospital", sa.String(200), nullable=False),
        sa.Column("node_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("delta", sa.Float(), nullable=True),
        sa.Column("noise_multiplier", sa.Float(), nullable=True),
        sa.Column("sample_rate", sa.Float(), nullable=True),
        sa.Column("steps", sa.BigInteger(), nullable=True),
        sa.Column("accountant", sa.String(32), nullable=True),
        sa.Column("bytes_received", sa.BigInteger(), nullable=False),
        sa.Column("eval_accuracy", sa.Float(), nullable=True),
        sa.Column("eval_loss", sa.Float(), nullable=True),
        sa.Column("eval_samples", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_participations")),
        sa.UniqueConstraint(
            "round_id", "hospital", name=op.f("uq_participations_round_id_hospital")
        ),
        sa.CheckConstraint(
            "status IN ('ok', 'refused', 'rejected', 'failed', 'evaluated')",
            name=op.f("ck_participations_status"),
        ),
        sa.CheckConstraint("samples >= 0", name=op.f("ck_participations_samples")),
        sa.CheckConstraint("bytes_received >= 0", name=op.f("ck_participations_bytes_received")),
        sa.CheckConstraint(
            "eval_samples IS NULL OR eval_samples >= 0", name=op.f("ck_participations_eval_samples")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name=op.f("fk_participations_round_id_rounds")
        ),
    )


def downgrade() -> None:
    """Drop every table (children first): the store is empty afterwards."""
    op.drop_table("participations")
    op.drop_index(op.f("uq_rounds_committed"), table_name="rounds")
    op.drop_table("rounds")
    op.drop_table("privacy_ledger")
    op.drop_table("models")
    op.drop_index(op.f("ix_audit_events_job_id"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("jobs")
