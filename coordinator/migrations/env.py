"""Alembic environment of the round store.

:class:`fedvault.coordinator.store.RoundStore` runs the migrations itself, in
its own locked transaction, and hands the connection over in
``config.attributes["connection"]``; developers may also run ``alembic`` by
hand with ``-x url=...`` (or ``sqlalchemy.url``). The version table is not
schema-qualified, so on PostgreSQL it lives in the first schema of the
connection's ``search_path``, next to the tables it describes. Logging is left
alone: a daemon that opens its store must keep its own logging configuration.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from fedvault.coordinator.store_models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("pass the store URL: alembic -x url=sqlite:///PATH upgrade head")
    return url


def run_migrations_offline() -> None:
    """Emit the SQL of the migrations instead of running them (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on a fresh one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        # The caller's transaction (already open) makes this a no-op: it commits.
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
