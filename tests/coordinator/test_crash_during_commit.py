"""kill -9 of the coordinator *during* a round's commit: all of the round, or none of it.

A child process opens the store, commits round 1, then starts committing round
2 and SIGKILLs itself from inside the transaction: after its first statement,
in the middle, or at the last moment before ``COMMIT`` is sent. The parent
reopens the store and checks that every table is exactly as it was after round
1 (a canonical dump of all rows, blobs as bytes), that the audit chain still
verifies, and that round 2 then commits once, as if nothing had happened. Runs
on a SQLite file and PostgreSQL, without and with an at-rest key.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import MetaData, select

from .conftest import Rounds, StoreTarget

CHILD = """\
import json, os, signal, sys
from sqlalchemy import event
from fedvault.coordinator.store import RoundStore
sys.path.insert(0, sys.argv[2])
from conftest import Rounds

spec = json.loads(sys.argv[1])
key = bytes.fromhex(spec["key"]) if spec["key"] else None
store = RoundStore(spec["url"], at_rest_key=key, engine_kwargs=spec["engine_kwargs"])
data = Rounds()
job = store.open_job("crash", {"rounds": 3})
store.commit_round(job.id, data.commit(1))
print("ROUND-1-COMMITTED", flush=True)

point, statements = spec["point"], 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

@event.listens_for(store.engine, "after_cursor_execute")
def _after(conn, cursor, statement, parameters, context, executemany):
    global statements
    statements += 1
    if point.startswith("statement:") and statements == int(point.split(":")[1]):
        die()

@event.listens_for(store.engine, "commit")
def _commit(conn):
    if point == "before-commit":
        die()

store.commit_round(job.id, data.commit(2, refused=("hospital-3",)))
print("NOT KILLED after", statements, "statements", flush=True)
"""

#: The first statement, one in the middle, and the instant before COMMIT.
POINTS = ("statement:1", "statement:4", "before-commit")


def _dump(target: StoreTarget) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order (a byte-exact picture)."""
    engine = target.raw_engine()
    try:
        meta = MetaData()
        meta.reflect(engine)
        out = {}
        with engine.connect() as conn:
            for name, table in sorted(meta.tables.items()):
                order = list(table.primary_key.columns) or list(table.columns)
                out[name] = [tuple(row) for row in conn.execute(select(table).order_by(*order))]
        return out
    finally:
        engine.dispose()


@pytest.mark.parametrize("point", POINTS)
def test_kill_during_commit_leaves_round_one_exactly(
    durable_target: StoreTarget, data: Rounds, point: str
) -> None:
    from pathlib import Path

    spec = {
        "url": durable_target.url,
        "engine_kwargs": durable_target.engine_kwargs,
        "key": durable_target.at_rest_key.hex() if durable_target.at_rest_key else "",
        "point": point,
    }
    here = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec), here],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ROUND-1-COMMITTED" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])

    after_crash = _dump(durable_target)
    with durable_target.open() as store:
        job = store.get_job("crash")
        assert job is not None
        assert store.last_committed_round(job.id) == 1
        assert [r.number for r in store.rounds(job.id)] == [1]
        assert {row.round for row in store.ledger(job.id)} == {1}
        assert store.verify_audit_chain() is None
        assert store.latest_model(job.id) == data.commit(1).model

    # A store that only reads leaves every byte as the crash left it...
    assert _dump(durable_target) == after_crash
    # ...and round 2 commits once, as if the crash never happened.
    with durable_target.open() as store:
        job = store.get_job("crash")
        assert job is not None
        store.commit_round(job.id, data.commit(2, refused=("hospital-3",)))
        assert [r.number for r in store.rounds(job.id)] == [1, 2]
        assert sorted(row.round for row in store.ledger(job.id)) == [1, 1, 2, 2]
        assert store.verify_audit_chain() is None
