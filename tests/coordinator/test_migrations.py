"""Schema migrations of the round store, on a SQLite file and PostgreSQL.

Each test builds an older database by hand (Alembic to revision 0001, or the
legacy ``create_all`` DDL), fills it, and opens it with :class:`RoundStore`,
which must bring it to the head revision with every row intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, bindparam, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from fedvault.coordinator.migrations import alembic_config, head_revision, known_revisions
from fedvault.coordinator.records import ModelBlob
from fedvault.coordinator.store import sqlite_url
from fedvault.coordinator.store_models import (
    GENESIS_HASH,
    Base,
    UTCDateTime,
    audit_hash,
    canonical_json,
)
from fedvault.errors import StoreError

if TYPE_CHECKING:  # fixtures' types; conftest is not importable under --import-mode=importlib
    from conftest import Rounds, StoreTarget

LEGACY_SQLITE_DDL = Path(__file__).parent / "data" / "legacy_create_all.sqlite.sql"
CONFIG = {"rounds": 5, "epsilon": 3.0}
STATE = json.dumps({"history": [[1.1, 0.01, 10]]})
MODEL = bytes(range(256)) * 3
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _migrate(target: StoreTarget, revision: str) -> None:
    engine = target.raw_engine()
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(connection=conn), revision)
    finally:
        engine.dispose()


def _legacy_sqlite(path: Path) -> None:
    engine = create_engine(sqlite_url(path))
    try:
        with engine.begin() as conn:
            for statement in LEGACY_SQLITE_DDL.read_text().split(";"):
                body = "\n".join(
                    line for line in statement.splitlines() if not line.startswith("--")
                )
                if body.strip():
                    conn.exec_driver_sql(body)
    finally:
        engine.dispose()


def _fill_0001(target: StoreTarget) -> None:
    """One job at revision 0001: a committed plaintext round with a ledger row, and a
    valid two-event audit chain, written with that revision's columns only (every
    table is empty, so each first row gets id 1)."""
    engine = target.raw_engine()
    events = [("job.created", {"config": CONFIG}), ("round.committed", {"round": 1})]
    prev, chain = GENESIS_HASH, []
    for kind, detail in events:
        digest = audit_hash(
            prev, kind=kind, actor="coordinator", job="j", detail=detail, created_at=T0
        )
        chain.append({"k": kind, "d": canonical_json(detail), "p": prev, "h": digest})
        prev = digest
    statements: list[tuple[str, dict[str, Any]]] = [
        (
            "INSERT INTO jobs (name, config, status, created_at, updated_at) "
            "VALUES ('j', :c, 'running', :t, :t)",
            {"c": canonical_json(CONFIG)},
        ),
        (
            "INSERT INTO rounds (job_id, number, attempt, status, reason, started_at, "
            "committed_at, total_weight, num_participants, train_loss) "
            "VALUES (1, 1, 1, 'committed', '', :t, :t, 100.0, 1, 0.5)",
            {},
        ),
        (
            "INSERT INTO participations (round_id, hospital, node_id, status, reason, "
            "samples, epsilon, delta, steps, accountant, bytes_received) VALUES "
            "(1, 'hospital-1', 7, 'ok', '', 100, 0.4, 0.00001, 10, 'prv', 1000)",
            {},
        ),
        (
            "INSERT INTO models (job_id, round, kind, blob, sha256, total_weight, created_at) "
            "VALUES (1, 1, 'plain', :b, :s, 100.0, :t)",
            {"b": MODEL, "s": hashlib.sha256(MODEL).hexdigest()},
        ),
        (
            "INSERT INTO privacy_ledger (job_id, hospital, round, epsilon, delta, steps, "
            "accountant, accountant_state) VALUES (1, 'hospital-1', 1, 0.4, 0.00001, 10, "
            "'prv', :a)",
            {"a": STATE},
        ),
        *(
            (
                "INSERT INTO audit_events (job_id, created_at, kind, actor, detail, prev_hash, "
                "hash) VALUES (1, :t, :k, 'coordinator', :d, :p, :h)",
                e,
            )
            for e in chain
        ),
    ]
    try:
        with engine.begin() as conn:
            for sql, params in statements:
                # Timestamps through the store's own type, as the store of that era wrote them.
                stmt = text(sql)
                if ":t" in sql:
                    stmt = stmt.bindparams(bindparam("t", T0, type_=UTCDateTime()))
                conn.execute(stmt, params)
    finally:
        engine.dispose()


def _check_upgraded(target: StoreTarget, data: Rounds) -> None:
    """The filled store, opened by today's code: at head, every row as written."""
    with target.open() as store:
        assert store.schema_revision() == head_revision() == "0005"
        # Foreign keys are enforced again on the connection that migrated (SQLite).
        with pytest.raises(IntegrityError, match=r"(?i)foreign key"), store.engine.begin() as conn:
            conn.execute(text("UPDATE rounds SET job_id = 99"))
        job = store.get_job("j")
        assert job is not None and (job.id, job.status, dict(job.config)) == (1, "running", CONFIG)
        assert store.latest_model(1) == ModelBlob(1, "plain", MODEL, 100.0)
        (view,) = store.rounds(1)
        (p,) = view.participations
        assert (p.hospital, p.node_id, p.epsilon, p.steps, p.accountant_state) == (
            "hospital-1",
            7,
            0.4,
            10,
            STATE,
        )
        assert [(r.round, r.epsilon) for r in store.ledger(1)] == [(1, 0.4)]
        assert store.verify_audit_chain() is None
        assert [e.created_at for e in store.audit_events()] == [T0, T0]
        # The job goes on with the new schema: a round, a pause (new in 0002).
        assert store.open_job("j", CONFIG) == job
        store.commit_round(1, data.commit(2))
        store.set_job_status(1, "paused")
        assert store.last_committed_round(1) == 2
    with target.raw_engine().connect() as conn:
        at_rest = conn.execute(text("SELECT round, at_rest FROM models ORDER BY round")).all()
        assert [tuple(r) for r in at_rest] == [(1, "none"), (2, "none")]
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        assert versions == ["0005"]


def _constraints(conn: Connection) -> dict[str, list[tuple[str, str]]]:
    insp = inspect(conn)
    return {
        t: sorted(
            [("ck", str(c["name"])) for c in insp.get_check_constraints(t)]
            + [("uq", str(c["name"])) for c in insp.get_unique_constraints(t)]
            + [("ix", str(c["name"])) for c in insp.get_indexes(t)]
            + [("fk", str(c["name"])) for c in insp.get_foreign_keys(t)]
        )
        for t in sorted(insp.get_table_names())
        if t != "alembic_version"
    }


def _sqlite_schema(path: Path) -> list[str]:
    engine = create_engine(sqlite_url(path))
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL "
                "AND name NOT IN ('alembic_version', 'sqlite_sequence') ORDER BY name"
            ).scalars()
            return [re.sub(r"\s+", " ", s).replace("( ", "(").replace(" )", ")") for s in rows]
    finally:
        engine.dispose()


# -- tests --------------------------------------------------------------------------


def test_migrations_build_exactly_the_models(durable_backend: StoreTarget) -> None:
    """Replaying 0001 -> head gives the schema a new store builds from the models."""
    assert known_revisions() == {"0001", "0002", "0003", "0004", "0005"}
    _migrate(durable_backend, "head")
    engine = durable_backend.raw_engine()
    try:
        with engine.connect() as conn:
            # Tables, columns, types, nullability, indexes, unique and foreign keys ...
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            migrated = _constraints(conn)
    finally:
        engine.dispose()
    # ... and the named CHECK constraints, which autogenerate does not compare.
    assert sorted(migrated) == sorted(Base.metadata.tables)
    for name, table in Base.metadata.tables.items():
        checks = {str(c.name) for c in table.constraints if type(c).__name__ == "CheckConstraint"}
        assert {n for kind, n in migrated[name] if kind == "ck"} == checks, name
    assert ("ck", "ck_jobs_status") in migrated["jobs"]
    assert ("ck", "ck_models_at_rest") in migrated["models"]


def test_revision_0001_is_the_legacy_create_all_schema(tmp_path: Path) -> None:
    _legacy_sqlite(tmp_path / "legacy.sqlite")
    engine = create_engine(sqlite_url(tmp_path / "migrated.sqlite"))
    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), "0001")
    engine.dispose()
    assert _sqlite_schema(tmp_path / "migrated.sqlite") == _sqlite_schema(
        tmp_path / "legacy.sqlite"
    )


def test_store_at_0001_is_upgraded_with_data_intact(
    durable_backend: StoreTarget, data: Rounds
) -> None:
    _migrate(durable_backend, "0001")
    _fill_0001(durable_backend)
    _check_upgraded(durable_backend, data)
    # The recreated tables kept their constraints.
    engine = durable_backend.raw_engine()
    for sql in ("UPDATE models SET at_rest = 'rot13'", "UPDATE jobs SET status = 'done'"):
        with pytest.raises(IntegrityError, match=r"(?i)check"), engine.begin() as conn:
            conn.execute(text(sql))
    engine.dispose()


def test_legacy_store_without_version_table_is_stamped_then_upgraded(
    durable_backend: StoreTarget, data: Rounds, caplog: pytest.LogCaptureFixture
) -> None:
    if durable_backend.backend == "sqlite-file":
        _legacy_sqlite(Path(durable_backend.url.removeprefix("sqlite:///")))
    else:  # PostgreSQL: revision 0001 without its version table is the legacy schema
        _migrate(durable_backend, "0001")
        engine = durable_backend.raw_engine()
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
        engine.dispose()
    _fill_0001(durable_backend)
    with caplog.at_level(logging.WARNING, logger="fedvault.coordinator.migrations"):
        _check_upgraded(durable_backend, data)
    (record,) = [r for r in caplog.records if "predates schema migrations" in r.message]
    assert "stamping it as revision 0001, then upgrading it to 0005" in record.message


def test_store_from_a_newer_fedvault_is_refused(durable_backend: StoreTarget) -> None:
    with durable_backend.open() as store, store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0042_from_the_future'"))
    with pytest.raises(StoreError) as excinfo:
        durable_backend.open()
    message = str(excinfo.value)
    assert "schema revision '0042_from_the_future'" in message
    assert "newer fedvault wrote it" in message and "Upgrade fedvault" in message
    with durable_backend.raw_engine().connect() as conn:  # untouched
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
            "0042_from_the_future"
        )


def test_partial_store_is_refused(durable_backend: StoreTarget) -> None:
    engine = durable_backend.raw_engine()
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE jobs (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(StoreError, match=r"holds some round-store tables \(\['jobs'\]\)"):
        durable_backend.open()


def test_concurrent_openers_migrate_once(durable_backend: StoreTarget) -> None:
    _migrate(durable_backend, "0001")
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def open_store() -> None:
        barrier.wait()
        try:
            durable_backend.open().close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    with durable_backend.raw_engine().connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert versions == ["0005"]


def test_downgrade_to_0001_refuses_to_lose_sealed_rows(
    durable_backend: StoreTarget, data: Rounds
) -> None:
    def downgrade() -> None:
        engine = durable_backend.raw_engine()
        try:
            with engine.begin() as conn:
                command.downgrade(alembic_config(connection=conn), "0001")
        finally:
            engine.dispose()

    with durable_backend.open(at_rest_key=bytes(32)) as store:
        job = store.open_job("j", CONFIG)
        store.commit_round(job.id, data.commit(1))  # BFV model, sealed accountant states
    with pytest.raises(RuntimeError, match="privacy_ledger are encrypted at rest"):
        downgrade()
    engine = durable_backend.raw_engine()
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM privacy_ledger"))
    engine.dispose()
    downgrade()
    with durable_backend.raw_engine().connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
        assert "at_rest" not in {c["name"] for c in inspect(conn).get_columns("models")}
    with durable_backend.open() as store:  # and up again, data intact
        assert store.last_committed_round(job.id) == 1
        assert store.latest_model(job.id) == ModelBlob(1, "bfv", data.blob(1), 300.0)


def _model_kinds(target: StoreTarget) -> list[tuple[int, int, str]]:
    engine = target.raw_engine()
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT job_id, round, kind FROM models ORDER BY job_id, round")
            )
            return [(r.job_id, r.round, r.kind) for r in rows]
    finally:
        engine.dispose()


def _refuses_kind(target: StoreTarget, kind: str) -> None:
    engine = target.raw_engine()
    try:
        with pytest.raises(IntegrityError, match=r"(?i)check"), engine.begin() as conn:
            conn.execute(text("UPDATE models SET kind = :k WHERE job_id = 2"), {"k": kind})
    finally:
        engine.dispose()


def test_store_at_0003_relabels_ckks_models_bfv_and_back(
    durable_backend: StoreTarget, data: Rounds
) -> None:
    """Revision 0004: encrypted models written as kind 'ckks' load as 'bfv'; its
    downgrade labels them 'ckks' again, and neither way loses a byte."""
    _migrate(durable_backend, "0003")
    _fill_0001(durable_backend)  # job 1: a plaintext model (columns of 0001 are still valid)
    initial = b"initial-ciphertext" * 64
    engine = durable_backend.raw_engine()
    with engine.begin() as conn:  # job 2: an HE job's initial model, as 0003 stored it
        conn.execute(
            text(
                "INSERT INTO jobs (name, config, status, created_at, updated_at) "
                "VALUES ('he', :c, 'running', :t, :t)"
            ).bindparams(bindparam("t", T0, type_=UTCDateTime())),
            {"c": canonical_json(CONFIG)},
        )
        conn.execute(
            text(
                "INSERT INTO models (job_id, round, kind, blob, sha256, total_weight, "
                "created_at) VALUES (2, 0, 'ckks', :b, :s, 0.0, :t)"
            ).bindparams(bindparam("t", T0, type_=UTCDateTime())),
            {"b": initial, "s": hashlib.sha256(initial).hexdigest()},
        )
    engine.dispose()

    with durable_backend.open() as store:
        assert store.schema_revision() == head_revision()
        assert store.latest_model(1) == ModelBlob(1, "plain", MODEL, 100.0)
        # A restarted coordinator re-sends the stored initial model, now labelled bfv.
        fresh = ModelBlob(0, "bfv", b"other-randomness", 0.0)
        assert store.save_initial_model(2, fresh) == ModelBlob(0, "bfv", initial, 0.0)
        store.commit_round(2, data.commit(1))
        assert store.latest_model(2) == ModelBlob(1, "bfv", data.blob(1), 300.0)
    assert _model_kinds(durable_backend) == [(1, 1, "plain"), (2, 0, "bfv"), (2, 1, "bfv")]
    _refuses_kind(durable_backend, "ckks")

    engine = durable_backend.raw_engine()
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "0003")
    finally:
        engine.dispose()
    assert _model_kinds(durable_backend) == [(1, 1, "plain"), (2, 0, "ckks"), (2, 1, "ckks")]
    _refuses_kind(durable_backend, "bfv")

    with durable_backend.open() as store:  # and up again, data intact
        assert store.schema_revision() == head_revision()
        assert store.model(2, 0) == ModelBlob(0, "bfv", initial, 0.0)
        assert store.latest_model(2) == ModelBlob(1, "bfv", data.blob(1), 300.0)
        assert store.verify_audit_chain() is None


def test_store_at_0004_gains_queued_jobs_and_refuses_to_lose_them(
    durable_backend: StoreTarget,
) -> None:
    """Revision 0005: ``queued`` is a job status; its downgrade is refused while one waits."""
    _migrate(durable_backend, "0004")
    _fill_0001(durable_backend)
    with durable_backend.open() as store:
        assert store.schema_revision() == "0005"
        store.submit_job("next", {"rounds": 1})
        assert [(j.name, j.status) for j in store.job_queue()] == [
            ("j", "running"),
            ("next", "queued"),
        ]
    engine = durable_backend.raw_engine()
    try:
        with pytest.raises(RuntimeError, match="a job is queued"), engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "0004")
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET status = 'stopped' WHERE name = 'next'"))
            command.downgrade(alembic_config(connection=conn), "0004")
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET status = 'queued' WHERE name = 'next'"))
    finally:
        engine.dispose()
    with durable_backend.open() as store:  # and up again
        assert store.schema_revision() == "0005"
        job = store.get_job("next")
        assert job is not None and job.status == "stopped"
