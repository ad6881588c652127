"""The task's evaluation metrics: per hospital and pooled per round.

* ``participations.eval_metrics``: a hospital's own values of its task's
  metrics on its held-out data (JSON text: name -> number).
* ``rounds.eval_metrics``: the consortium-wide values pooled from the
  hospitals' statistics (confusion counts, score histograms, error sums;
  see ``fedvault.metrics``), JSON text.

Rows written before this revision have neither (NULL): their rounds keep the
sample-weighted accuracy and loss they always had.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the two nullable JSON columns."""
    # Plain ALTER TABLE (SQLite >= 3.35 adds and drops columns in place): a batch
    # copy of the table would leave its temporary table behind on SQLite when a
    # later step of the same migration run fails.
    for table in ("rounds", "participations"):
        op.add_column(table, sa.Column("eval_metrics", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop them again (the metrics are lost; accuracy and loss stay)."""
    # Only where the column is still there: on SQLite a failed later step of the
    # same downgrade run does not roll this DDL back, and the run may be retried.
    inspector = sa.inspect(op.get_bind())
    for table in ("participations", "rounds"):
        if "eval_metrics" in {c["name"] for c in inspector.get_columns(table)}:
            op.drop_column(table, "eval_metrics")
