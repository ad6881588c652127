"""Schema migrations of the round store (Alembic), run by the store itself.

:class:`~fedvault.coordinator.store.RoundStore` calls :func:`upgrade` every time
it opens a store, inside one locked write transaction, so a coordinator started
on an older store upgrades it in place, two coordinators cannot both migrate,
and a migration that fails leaves the store as it was (SQLite and PostgreSQL
both have transactional DDL). Three cases need care:

* a new (empty) database: the tables are built from the models at once and
  stamped with the head revision, as Alembic's cookbook recommends;
* a store created before migrations existed (by ``metadata.create_all``): it
  has every table of revision ``0001`` but no ``alembic_version`` table, so it
  is stamped ``0001`` first, with a log line saying so;
* a store written by a *newer* fedvault (a revision this code does not know):
  refused, since an older coordinator would misread or damage it;
* a database that holds only some of the store's tables: refused, since no
  revision describes it.

The Alembic configuration is built in code (no ``alembic.ini``): developers
write a new revision with
``command.revision(alembic_config(url=URL), autogenerate=True, message=...)``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect

from fedvault.errors import StoreError

from ..store_models import Base

__all__ = [
    "LEGACY_REVISION",
    "LEGACY_TABLES",
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "head_revision",
    "known_revisions",
    "upgrade",
]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent
LEGACY_REVISION = "0001"
# The tables `metadata.create_all` made before migrations (= revision 0001).
LEGACY_TABLES = frozenset(
    {"jobs", "rounds", "participations", "models", "privacy_ledger", "audit_events"}
)


def alembic_config(*, connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic configuration for the store's migrations, built without a file.

    Parameters
    ----------
    connection
        Run on this connection, inside its open transaction (what the store does).
    url
        Or connect to this database URL (developer use: new revisions, SQL scripts).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows (the schema it reads and writes)."""
    head = _script().get_current_head()
    if head is None:  # pragma: no cover - the package ships its revisions
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}; reinstall fedvault")
    return head


def known_revisions() -> frozenset[str]:
    """Every revision this code can upgrade from."""
    return frozenset(s.revision for s in _script().walk_revisions())


def current_revision(connection: Connection) -> str | None:
    """The store's revision (``None``: no version table, i.e. empty or legacy)."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, *, where: str) -> str | None:
    """Bring the store on ``connection`` to :func:`head_revision`.

    Runs inside the caller's open transaction, which must hold the store's
    writer lock; the caller commits. ``where`` names the store in messages.

    Returns
    -------
    str | None
        The revision the store was at before (``None`` for a new store), or
        :func:`head_revision` when there was nothing to do.

    Raises
    ------
    StoreError
        The store was written by a newer fedvault, or holds only part of the
        store's tables.
    """
    head = head_revision()
    current = current_revision(connection)
    if current == head:
        return head
    if current is not None and current not in known_revisions():
        raise StoreError(
            f"the round store at {where} is at schema revision {current!r}, which this "
            f"fedvault does not know (its newest is {head!r}): a newer fedvault wrote it. "
            "Upgrade fedvault on this machine, or pass another --store"
        )
    if current is None:
        present = LEGACY_TABLES & set(inspect(connection).get_table_names())
        if not present:
            # A new store: the models ARE the head schema (a test holds the two equal),
            # and building them at once is ten times faster than replaying history.
            log.info("creating the round store at %s (schema revision %s)", where, head)
            Base.metadata.create_all(connection)
            _stamp(connection, head, where=where)
            return None
        if present != LEGACY_TABLES:
            raise StoreError(
                f"the database at {where} holds some round-store tables ({sorted(present)}) but "
                f"not all of them, and no alembic_version table: it is not a fedvault store "
                "this code can upgrade. Restore it from a backup, or pass another --store"
            )
        log.warning(
            "round store at %s predates schema migrations (no alembic_version table); "
            "stamping it as revision %s, then upgrading it to %s",
            where,
            LEGACY_REVISION,
            head,
        )
        _stamp(connection, LEGACY_REVISION, where=where)
        current = LEGACY_REVISION
    log.info("upgrading the round store at %s from revision %s to %s", where, current, head)
    try:
        command.upgrade(alembic_config(connection=connection), "head")
    except CommandError as exc:
        raise StoreError(
            f"cannot migrate the round store at {where} to revision {head}: {exc}; nothing was "
            "changed. Restore the store from a backup or pass another --store"
        ) from exc
    return current


def _stamp(connection: Connection, revision: str, *, where: str) -> None:
    try:
        MigrationContext.configure(connection).stamp(_script(), revision)
    except CommandError as exc:  # pragma: no cover - both revisions ship with the package
        raise StoreError(f"cannot stamp the round store at {where} as {revision}: {exc}") from exc
