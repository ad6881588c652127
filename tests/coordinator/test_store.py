"""Contract tests of RoundStore, run on SQLite (memory, file) and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import event, text

from fedvault.coordinator.records import (
    AuditEvent,
    HospitalEval,
    LedgerRow,
    ModelBlob,
    Participation,
)
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.coordinator.store_models import GENESIS_HASH, canonical_json
from fedvault.errors import InvalidConfigError, MalformedUpdateError, StoreError

if TYPE_CHECKING:  # fixtures' types; conftest is not importable under --import-mode=importlib
    from conftest import Rounds, StoreTarget

CONFIG = {"rounds": 10, "epsilon": 3.0, "delta": 1e-5, "hospitals": ["hospital-1", "hospital-2"]}


def _snapshot(store: RoundStore, job_id: int) -> tuple[object, ...]:
    """Everything a commit could have touched, to prove a failed one touched nothing."""
    return (
        store.last_committed_round(job_id),
        store.rounds(job_id),
        store.latest_model(job_id),
        store.ledger(job_id),
        [(e.id, e.hash) for e in store.audit_events()],
        sorted(label for label, _ in store.iter_blobs()),
    )


# -- jobs ---------------------------------------------------------------------------


def test_open_job_creates_then_resumes(store: RoundStore) -> None:
    job = store.open_job("breast-cancer", CONFIG)
    assert (job.name, job.status, dict(job.config)) == ("breast-cancer", "running", CONFIG)
    again = store.open_job("breast-cancer", dict(reversed(list(CONFIG.items()))))
    assert again == job
    assert store.get_job("breast-cancer") == job
    assert store.get_job("digits") is None
    other = store.open_job("digits", CONFIG)
    assert other.id != job.id
    assert store.list_jobs() == [job, other]
    assert [e.kind for e in store.audit_events(job.id)] == ["job.created", "job.resumed"]


def test_open_job_conflict_names_the_differing_keys(store: RoundStore) -> None:
    job = store.open_job("j", CONFIG)
    with pytest.raises(StoreError) as excinfo:
        store.open_job("j", {**CONFIG, "rounds": 5, "seed": 7})
    message = str(excinfo.value)
    assert "job 'j' already exists in this store with rounds=10, seed=<unset>" in message
    assert "rounds=5, seed=7" in message
    assert "use another --out/--store or the same settings to resume" in message
    assert "epsilon" not in message  # equal keys are not named
    assert store.get_job("j") == job


def test_job_status_and_validation(store: RoundStore) -> None:
    job = store.open_job("j", CONFIG)
    store.set_job_status(job.id, "finished")
    got = store.get_job("j")
    assert got is not None and got.status == "finished"
    with pytest.raises(InvalidConfigError, match="not one of"):
        store.set_job_status(job.id, "done")
    with pytest.raises(StoreError, match="no job with id 999"):
        store.set_job_status(999, "failed")
    with pytest.raises(InvalidConfigError, match="not plain JSON"):
        store.open_job("k", {"epsilon": float("nan")})


# -- rounds -------------------------------------------------------------------------


def test_commit_round_stores_everything(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    assert store.last_committed_round(job.id) == 0
    assert store.latest_model(job.id) is None
    commits = [data.commit(1), data.commit(2, refused=["hospital-3"])]
    for commit in commits:
        store.commit_round(job.id, commit)
    assert store.last_committed_round(job.id) == 2
    assert store.latest_model(job.id) == ModelBlob(2, "bfv", data.blob(2), 300.0)

    views = store.rounds(job.id)
    assert [(v.number, v.status, v.attempt) for v in views] == [
        (1, "committed", 1),
        (2, "committed", 1),
    ]
    for view, commit in zip(views, commits, strict=True):
        # Every field round-trips, node ids >= 2**63 and accountant state included.
        assert view.participations == commit.participations
        assert view.total_weight == 300.0
        assert view.num_participants == 2
        assert view.train_loss == pytest.approx(commit.train_loss, rel=1e-12)
        assert view.eval_accuracy is None and view.evaluations == ()
        assert view.committed_at is not None and view.committed_at.tzinfo == UTC
    assert views[1].participations[2].reason == "budget exhausted"
    # What the ServerApp reads after each round: that round alone, the same view.
    assert store.rounds(job.id, after=1) == views[1:]
    assert store.rounds(job.id, after=2) == []


def test_ledger_has_ok_participations_only(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    no_dp = Participation(hospital="hospital-4", status="ok", samples=50)  # reported no ε
    store.commit_round(job.id, data.commit(1, refused=["hospital-3"], extra=[no_dp]))
    store.commit_round(job.id, data.commit(2, ["hospital-2"], rejected=["hospital-1"]))
    expected = [
        LedgerRow("hospital-1", 1, 0.31, 1e-5, 1.1, 0.01, 10, "prv"),
        LedgerRow("hospital-2", 1, 0.32, 1e-5, 1.1, 0.02, 10, "prv"),
        LedgerRow("hospital-2", 2, 0.62, 1e-5, 1.1, 0.02, 20, "prv"),
    ]
    got = store.ledger(job.id)
    assert [(r.hospital, r.round, r.steps) for r in got] == [
        (e.hospital, e.round, e.steps) for e in expected
    ]
    for row, want in zip(got, expected, strict=True):
        assert row.epsilon == pytest.approx(want.epsilon, rel=1e-12)
        assert (row.delta, row.noise_multiplier, row.accountant) == (1e-5, 1.1, "prv")
        assert row.sample_rate == pytest.approx(want.sample_rate, rel=1e-12)


@pytest.mark.parametrize("failure", ["duplicate-participation", "invalid-audit-detail"])
def test_commit_round_is_all_or_nothing(store: RoundStore, data: Rounds, failure: str) -> None:
    job = store.open_job("j", CONFIG)
    store.commit_round(job.id, data.commit(1))
    before = _snapshot(store, job.id)
    if failure == "duplicate-participation":
        # The database refuses the second row of hospital-1 after the round row,
        # the first participations and the model were already sent.
        bad = data.commit(2, extra=[data.participation("hospital-1", 2)])
    else:
        # Fails while chaining the audit events, after every other row was flushed.
        bad = data.commit(2, audit=[AuditEvent(kind="x", actor="y", detail={"loss": float("nan")})])
    expected = "could not commit round 2" if failure.startswith("duplicate") else "not plain JSON"
    with pytest.raises(StoreError, match=expected):
        store.commit_round(job.id, bad)
    assert _snapshot(store, job.id) == before
    assert store.verify_audit_chain() is None
    store.commit_round(job.id, data.commit(2))  # the store is still usable
    assert store.last_committed_round(job.id) == 2


def test_commit_refuses_out_of_order_and_double_commits(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    with pytest.raises(StoreError, match="next one must be 1"):
        store.commit_round(job.id, data.commit(2))
    store.commit_round(job.id, data.commit(1))
    before = _snapshot(store, job.id)
    for number in (1, 3):
        with pytest.raises(
            StoreError, match="last committed round is 1, so the next one must be 2"
        ):
            store.commit_round(job.id, data.commit(number))
    assert _snapshot(store, job.id) == before
    other = store.open_job("other", CONFIG)  # round numbers are per job
    store.commit_round(other.id, data.commit(1))
    assert (store.last_committed_round(job.id), store.last_committed_round(other.id)) == (1, 1)


def test_failed_rounds_are_recorded_with_attempts(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    store.commit_round(job.id, data.commit(1))
    timeout = Participation(hospital="hospital-2", status="failed", reason="timed out")
    for reason in ("too few replies", "aggregation failed"):
        store.record_failed_round(
            job.id, 2, reason=reason, participations=[data.participation("hospital-1", 2), timeout]
        )
    store.commit_round(job.id, data.commit(2))
    views = store.rounds(job.id)
    assert [(v.number, v.attempt, v.status, v.reason) for v in views] == [
        (1, 1, "committed", ""),
        (2, 1, "failed", "too few replies"),
        (2, 2, "failed", "aggregation failed"),
        (2, 3, "committed", ""),
    ]
    failed = views[1]
    assert [(p.hospital, p.status, p.reason) for p in failed.participations] == [
        ("hospital-1", "ok", ""),
        ("hospital-2", "failed", "timed out"),
    ]
    assert (failed.num_participants, failed.total_weight, failed.committed_at) == (1, None, None)
    assert [r.round for r in store.ledger(job.id)] == [1, 1, 2, 2]  # failed attempts add none
    assert store.last_committed_round(job.id) == 2
    with pytest.raises(StoreError, match="next one must be 3"):
        store.record_failed_round(job.id, 2, reason="late", participations=[])
    failures = [e for e in store.audit_events(job.id) if e.kind == "round.failed"]
    assert [(e.detail["attempt"], e.detail["statuses"]) for e in failures] == [
        (1, {"hospital-1": "ok", "hospital-2": "failed"}),
        (2, {"hospital-1": "ok", "hospital-2": "failed"}),
    ]


def test_evaluation_is_weighted_and_replaced(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    store.commit_round(job.id, data.commit(1))
    first = [
        HospitalEval(hospital="hospital-1", accuracy=0.9, loss=0.3, samples=100),
        HospitalEval(hospital="hospital-2", accuracy=0.6, loss=0.9, samples=300),
        HospitalEval(hospital="hospital-3", accuracy=0.8, loss=0.5, samples=100),  # did not train
    ]
    store.record_evaluation(job.id, 1, evaluations=first)
    (view,) = store.rounds(job.id)
    # (0.9*100 + 0.6*300 + 0.8*100) / 500 and (0.3*100 + 0.9*300 + 0.5*100) / 500
    assert view.eval_accuracy == pytest.approx(0.70, rel=1e-12)
    assert view.eval_loss == pytest.approx(0.70, rel=1e-12)
    assert view.evaluations == tuple(first)
    assert [p.hospital for p in view.participations] == ["hospital-1", "hospital-2"]

    replacement = [HospitalEval(hospital="hospital-2", accuracy=0.95, loss=0.1, samples=50)]
    store.record_evaluation(job.id, 1, evaluations=replacement)
    (view,) = store.rounds(job.id)
    assert (view.eval_accuracy, view.eval_loss) == (0.95, 0.1)
    assert view.evaluations == tuple(replacement)
    assert view.participations == data.commit(1).participations  # training data untouched

    with pytest.raises(StoreError, match="round 2 of job 'j' is not committed"):
        store.record_evaluation(job.id, 2, evaluations=replacement)
    with pytest.raises(StoreError, match="must name each hospital once"):
        store.record_evaluation(job.id, 1, evaluations=replacement * 2)
    store.record_evaluation(job.id, 1, evaluations=[])  # nobody answered
    (view,) = store.rounds(job.id)
    assert (view.eval_accuracy, view.eval_loss, view.evaluations) == (None, None, ())
    with pytest.raises(MalformedUpdateError, match="accuracy"):
        HospitalEval(hospital="hospital-1", accuracy=1.5, loss=0.1, samples=10)


def test_latest_model_detects_corruption(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    store.commit_round(job.id, data.commit(1))
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE models SET blob = :b"), {"b": b"\xff" + data.blob(1)[1:]})
    with pytest.raises(StoreError, match="does not match its SHA-256"):
        store.latest_model(job.id)


def test_records_refuse_invalid_reports() -> None:
    with pytest.raises(MalformedUpdateError, match="epsilon"):
        Participation(hospital="h-1", status="ok", epsilon=float("inf"))
    with pytest.raises(MalformedUpdateError, match="samples"):
        Participation(hospital="h-1", status="ok", samples=-1)
    with pytest.raises(MalformedUpdateError, match="delta"):
        Participation(hospital="h-1", status="ok", delta=1.0)
    with pytest.raises(MalformedUpdateError, match="kind"):
        ModelBlob(1, "paillier", b"", 1.0)  # type: ignore[arg-type]


# -- audit --------------------------------------------------------------------------


def test_audit_chain_is_linked_and_hashed_as_specified(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    event = AuditEvent(kind="key.rotated", actor="hospital-1", detail={"epoch": 2})
    store.commit_round(job.id, data.commit(1, audit=[event]))
    store.append_audit(AuditEvent(kind="store.opened", actor="operator"))
    events = store.audit_events()
    assert [(e.kind, e.job) for e in events] == [
        ("job.created", "j"),
        ("round.committed", "j"),
        ("key.rotated", "j"),
        ("store.opened", None),
    ]
    assert events[1].detail["model_sha256"] == hashlib.sha256(data.blob(1)).hexdigest()
    assert events[0].prev_hash == GENESIS_HASH == "0" * 64
    for prev, row in itertools.pairwise(events):
        assert row.prev_hash == prev.hash
    # The hash formula, recomputed independently of the store's code path.
    row = events[2]
    body = json.dumps(
        {
            "kind": "key.rotated",
            "actor": "hospital-1",
            "job": "j",
            "detail": {"epoch": 2},
            "created_at": row.created_at.isoformat(),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert row.created_at.tzinfo == UTC
    assert row.hash == hashlib.sha256((row.prev_hash + body).encode()).hexdigest()
    assert store.verify_audit_chain() is None
    assert [e.kind for e in store.audit_events(job.id)] == [
        "job.created",
        "round.committed",
        "key.rotated",
    ]


@pytest.mark.parametrize("column", ["detail", "actor", "hash", "prev_hash"])
def test_tampering_is_detected_at_that_row(store: RoundStore, data: Rounds, column: str) -> None:
    job = store.open_job("j", CONFIG)
    for number in (1, 2, 3):
        store.commit_round(job.id, data.commit(number))
    events = store.audit_events()
    victim = events[2]
    assert store.verify_audit_chain() is None
    value = {
        "detail": canonical_json({**victim.detail, "total_weight": 1.0}),
        "actor": "someone-else",
        "hash": "f" * 64,
        "prev_hash": "e" * 64,
    }[column]
    with store.engine.begin() as conn:
        conn.execute(
            text(f"UPDATE audit_events SET {column} = :v WHERE id = :id"),
            {"v": value, "id": victim.id},
        )
    assert store.verify_audit_chain() == victim.id


# -- secrets ------------------------------------------------------------------------


def test_iter_blobs_covers_every_binary_and_text_column(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    marker = "SECRET-KEY-MARKER"
    commit = data.commit(
        1, extra=[Participation(hospital="hospital-9", status="refused", reason=marker)]
    )
    store.commit_round(job.id, commit)
    blobs = list(store.iter_blobs())
    labels = {label.split("#")[0] for label, _ in blobs}
    assert {
        "jobs.config",
        "models.blob",
        "privacy_ledger.accountant_state",
        "participations.reason",
        "audit_events.detail",
    } <= labels
    values = dict(blobs)
    model_labels = [label for label in values if label.startswith("models.blob#")]
    assert [values[label] for label in model_labels] == [data.blob(1)]
    states = {values[k] for k in values if k.startswith("privacy_ledger.accountant_state#")}
    plain = {p.accountant_state.encode() for p in commit.participations[:2] if p.accountant_state}
    if store.encrypts_at_rest:  # base64 of sealed blobs: no trace of the JSON
        assert len(states) == len(plain) == 2
        assert not any(b"history" in s or b"history" in base64.b64decode(s) for s in states)
    else:
        assert states == plain
    assert [k for k, v in values.items() if marker.encode() in v] == [
        next(
            k
            for k in values
            if k.startswith("participations.reason#") and values[k] == marker.encode()
        )
    ]
    assert all(isinstance(v, bytes) for v in values.values())


# -- durability and backends --------------------------------------------------------


def test_reopened_store_resumes_the_job(durable_target: StoreTarget, data: Rounds) -> None:
    with durable_target.open() as first:
        job = first.open_job("j", CONFIG)
        first.commit_round(job.id, data.commit(1))
        first.commit_round(job.id, data.commit(2))
    with durable_target.open() as second:
        resumed = second.open_job("j", CONFIG)
        assert resumed == job
        assert second.last_committed_round(job.id) == 2
        assert second.latest_model(job.id) == ModelBlob(2, "bfv", data.blob(2), 300.0)
        assert second.verify_audit_chain() is None
        assert second.audit_events()[-1].detail == {"last_committed_round": 2, "status": "running"}


def test_sqlite_file_is_wal_and_readable_during_a_write(tmp_path: Path, data: Rounds) -> None:
    url = sqlite_url(tmp_path / "fedvault.sqlite")
    with RoundStore(url) as writer, RoundStore(url) as reader:
        job = writer.open_job("j", CONFIG)
        with writer.engine.connect() as conn:
            pragmas = [
                conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "synchronous", "foreign_keys")
            ]
        assert pragmas == ["wal", 2, 1]  # synchronous=2 is FULL
        writer.commit_round(job.id, data.commit(1))
        # Hold a write transaction open; the reader must neither block nor see it.
        with writer.engine.connect().execution_options(fedvault_write=True) as conn, conn.begin():
            conn.execute(text("UPDATE jobs SET status = 'failed'"))
            result: list[object] = []
            thread = threading.Thread(target=lambda: result.append(reader.get_job("j")))
            thread.start()
            thread.join(timeout=10)
            assert not thread.is_alive()
        got = result[0]
        assert got is not None and got.status == "running"  # type: ignore[attr-defined]
        assert reader.last_committed_round(job.id) == 1


def test_unreachable_or_unwritable_stores_say_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "fedvault.sqlite"
    with pytest.raises(StoreError, match="cannot open the round store at sqlite:///") as excinfo:
        RoundStore(sqlite_url(missing))
    assert "writable" in str(excinfo.value) and "--store" in str(excinfo.value)
    secret = "s3cr3t-pw"
    with pytest.raises(StoreError) as excinfo:
        RoundStore(
            f"postgresql+psycopg://alice:{secret}@127.0.0.1:1/db",
            engine_kwargs={"connect_args": {"connect_timeout": 2}},
        )
    assert "postgresql+psycopg://alice:***@127.0.0.1:1/db" in str(excinfo.value)
    assert secret not in str(excinfo.value)
    with pytest.raises(StoreError, match="not a database URL"):
        RoundStore("not a url")


def test_rounds_query_count_does_not_grow_with_rounds(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("j", CONFIG)
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    def queries_for_rounds() -> int:
        statements.clear()
        event.listen(store.engine, "before_cursor_execute", count)
        try:
            store.rounds(job.id)
        finally:
            event.remove(store.engine, "before_cursor_execute", count)
        return len(statements)

    store.commit_round(job.id, data.commit(1))
    one = queries_for_rounds()
    for number in range(2, 7):
        store.commit_round(job.id, data.commit(number, refused=["hospital-3"]))
    assert queries_for_rounds() == one <= 6


def test_concurrent_writers_serialise(durable_target: StoreTarget, data: Rounds) -> None:
    with durable_target.open() as setup:
        job = setup.open_job("j", CONFIG)
    stores = [durable_target.open(), durable_target.open()]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def commit(store: RoundStore) -> None:
        barrier.wait()
        try:
            store.commit_round(job.id, data.commit(1))
            outcomes.append("committed")
        except StoreError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=commit, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert sorted(outcomes)[0] == "committed"
        assert "the last committed round is 1, so the next one must be 2" in sorted(outcomes)[1]
        assert stores[0].verify_audit_chain() is None
        assert [v.number for v in stores[1].rounds(job.id)] == [1]
    finally:
        for store in stores:
            store.close()
