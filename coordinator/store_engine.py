"""Opening the round store's database: engine, writer lock, schema and at-rest key.

Writers serialise: SQLite write transactions start with ``BEGIN IMMEDIATE``
(SQLAlchemy emits BEGIN itself, since Python's sqlite3 skips it before SELECTs,
which would let a read-then-write race), PostgreSQL ones take a transaction
advisory lock. File databases run in WAL mode with ``synchronous=FULL``: a
second process may read while the coordinator writes, and a committed round
survives power loss.

:func:`open_schema` runs the Alembic migrations (:mod:`.migrations`) under that
same writer lock, then checks the at-rest key against the one the store
recorded, so a wrong key is refused when the store opens rather than at the
first model read of a resumed job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from fedvault.errors import KeyMismatchError, StoreError

from .migrations import current_revision, head_revision, upgrade
from .store_models import StoreMetaTable

__all__ = [
    "PG_WRITER_LOCK",
    "WRITE_OPTION",
    "create_store_engine",
    "db_reason",
    "open_schema",
    "schema_transaction",
    "sqlite_url",
]

log = logging.getLogger(__name__)

WRITE_OPTION = "fedvault_write"  # execution option: this transaction writes
PG_WRITER_LOCK = 0x66656476  # "fedv": one writer at a time per PostgreSQL database
_KEY_ID = "at_rest_key_id"  # store_meta: id of the key that encrypts this store at rest


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of a SQLite file (absolute, so ``cd`` cannot move it)."""
    return URL.create("sqlite", database=str(Path(path).expanduser().resolve())).render_as_string()


def db_reason(exc: BaseException) -> str:
    """The driver's own message (first line): it says what the database refused."""
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def create_store_engine(url: URL, engine_kwargs: Mapping[str, object] | None) -> Engine:
    """An engine with the store's SQLite pragmas and explicit BEGIN (see the module)."""
    # Any: SQLAlchemy's create_engine checks the options it is given.
    kwargs: dict[str, Any] = dict(engine_kwargs or {})
    if url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    in_memory = url.database in (None, "", ":memory:")
    if in_memory:
        # One shared connection, or every new connection would see an empty database.
        kwargs.setdefault("poolclass", StaticPool)
        kwargs["connect_args"] = {"check_same_thread": False, **kwargs.get("connect_args", {})}
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN is ours (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


@contextmanager
def schema_transaction(engine: Engine, *, where: str) -> Iterator[Connection]:
    """A locked write transaction for migrations, committed on success.

    SQLite recreates a table to change a constraint, which foreign-key
    enforcement would refuse (the referenced table is dropped for a moment), so
    enforcement is off meanwhile and ``foreign_key_check`` must pass before the
    commit. The PRAGMA is a no-op inside a transaction, hence the raw driver
    connection before BEGIN.
    """
    postgres = engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        raw = None if postgres else conn.connection.driver_connection
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                if postgres:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_WRITER_LOCK})
                yield conn
                if raw is not None and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise StoreError(
                        f"migrating the round store at {where} broke a foreign key, so nothing "
                        "was changed; report this as a fedvault bug and keep using the old version"
                    )
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


def _stored_key_id(conn: Connection) -> str | None:
    return conn.scalar(select(StoreMetaTable.value).where(StoreMetaTable.name == _KEY_ID))


def open_schema(engine: Engine, *, where: str, key_id: str | None) -> str | None:
    """Bring the store to the head revision and check the at-rest key.

    Parameters
    ----------
    where
        The store's URL (password hidden), for messages.
    key_id
        :attr:`AtRestCipher.key_id <.at_rest.AtRestCipher.key_id>` of the opener's
        key, or ``None``. The first opener with a key records its id.

    Returns
    -------
    str | None
        The id of the key the store is encrypted under (``None``: never was).

    Raises
    ------
    KeyMismatchError
        The store was encrypted under another key.
    StoreError
        See :func:`.migrations.upgrade`.
    """
    head = head_revision()
    with engine.connect() as conn:  # the common case, read-only: nothing to do
        current = current_revision(conn)
        stored = _stored_key_id(conn) if current == head else None
        conn.rollback()
    if current != head or (key_id is not None and stored is None):
        with schema_transaction(engine, where=where) as conn:
            upgrade(conn, where=where)
            stored = _stored_key_id(conn)
            if stored is None and key_id is not None:
                conn.execute(insert(StoreMetaTable).values(name=_KEY_ID, value=key_id))
                stored = key_id
                log.info("round store at %s: encrypting at rest under key %s", where, key_id)
    if key_id is not None and stored != key_id:
        raise KeyMismatchError(
            f"the round store at {where} is encrypted at rest under key {stored}, not under "
            f"this key ({key_id}): pass the kit of the coordinator that created this store, "
            "or another --store"
        )
    return stored
