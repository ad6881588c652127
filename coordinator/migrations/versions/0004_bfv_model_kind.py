"""``models.kind``: an encrypted global model is ``bfv``, not ``ckks``.

fedvault has always encrypted with BFV (exact fixed-point integers, see
``fedvault.privacy.he_context``); the label ``ckks`` was a leftover of an early
design. Every encrypted model row is relabelled ``bfv`` and the CHECK constraint
``ck_models_kind`` allows ``bfv`` and ``plain``. The blobs, their SHA-256 and
their at-rest sealing do not depend on the label and are untouched.

Audit events are not rewritten: a ``round.committed`` event written before this
revision keeps ``"model_kind": "ckks"`` in its detail, since the hash chain
binds every event as it was written.

On SQLite, changing a CHECK constraint recreates the table (batch mode), once to
drop the old constraint and once to add the new one, with the rows relabelled
in between; the store runs migrations with foreign-key enforcement off and
checks the foreign keys before it commits.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_OLD_KINDS = "kind IN ('ckks', 'plain')"
_NEW_KINDS = "kind IN ('bfv', 'plain')"


def _clear_batch_leftover() -> None:
    """Drop the empty copy a failed earlier run left behind on SQLite.

    The store migrates in one explicit transaction, so a failure there undoes
    everything. A hand-run ``alembic`` on a plain SQLite connection does not:
    the driver autocommits the batch's first ``CREATE TABLE _alembic_tmp_models``,
    so when a later step of the same run fails (a refused downgrade to 0001)
    that empty table stays and the retry would stop on it.
    """
    if op.get_context().dialect.name == "sqlite":
        op.execute(sa.text("DROP TABLE IF EXISTS _alembic_tmp_models"))


def _relabel(old: str, new: str, check: str) -> None:
    """Drop ``ck_models_kind``, rename kind ``old`` to ``new``, add ``check``."""
    _clear_batch_leftover()
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint(op.f("ck_models_kind"), type_="check")
    op.execute(
        sa.text("UPDATE models SET kind = :new WHERE kind = :old").bindparams(old=old, new=new)
    )
    with op.batch_alter_table("models") as batch:
        batch.create_check_constraint(op.f("ck_models_kind"), sa.text(check))


def upgrade() -> None:
    """Relabel encrypted models ``ckks`` -> ``bfv``."""
    _relabel("ckks", "bfv", _NEW_KINDS)


def downgrade() -> None:
    """Relabel them ``bfv`` -> ``ckks`` (nothing is lost)."""
    _relabel("bfv", "ckks", _OLD_KINDS)
