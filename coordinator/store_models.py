"""SQLAlchemy 2 tables of the coordinator's round store.

The schema is the durable contract between a coordinator and whoever restarts
it, so integrity rules live in the database, not only in Python: CHECK
constraints on statuses and counts, one committed row per round (a partial
unique index), one model per round, and a UNIQUE ``prev_hash`` so two writers
can never fork the audit chain. Constraint names follow a fixed convention so
Alembic migrations can refer to them.

The audit chain is defined here too, because it is part of the stored format:
``hash = sha256(prev_hash || canonical JSON of {kind, actor, job, detail,
created_at})`` with ``job`` the job's name, ``created_at`` an ISO 8601 UTC
timestamp and ``prev_hash`` of the first row 64 zeros; and so are the mappings
between rows and the records of :mod:`.records`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from fedvault.errors import StoreError

from .at_rest import AT_REST_NONE, AT_REST_SCHEMES
from .records import AuditEvent, AuditRow, HospitalEval, Job, LedgerRow, Participation, RoundView

__all__ = [
    "GENESIS_HASH",
    "JOB_STATUSES",
    "AuditTable",
    "Base",
    "JobTable",
    "LedgerTable",
    "ModelTable",
    "ParticipationTable",
    "RoundTable",
    "StoreMetaTable",
    "append_audit_events",
    "audit_hash",
    "audit_query",
    "audit_record",
    "canonical_json",
    "first_broken_link",
    "job_record",
    "ledger_record",
    "ledger_values",
    "participation_record",
    "participation_values",
    "round_view",
    "utcnow",
]

GENESIS_HASH = "0" * 64
#: ``queued``: submitted to a coordinator service, waiting for the jobs before it.
JOB_STATUSES = ("queued", "running", "paused", "finished", "failed", "stopped")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: Sequence[str]) -> str:
    """SQL for a CHECK that ``column`` is one of ``values``."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def canonical_json(value: object) -> str:
    """Serialise ``value`` to one canonical JSON text.

    Sorted keys, no whitespace and no NaN/Infinity (not JSON, and not equal to
    themselves), so equal values give byte-equal text: config comparison and
    the audit hash depend on it. Raises ``TypeError``/``ValueError`` otherwise.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def audit_hash(
    prev_hash: str, *, kind: str, actor: str, job: str | None, detail: object, created_at: datetime
) -> str:
    """Hash one audit event onto the chain (see the module docstring)."""
    body = canonical_json(
        {
            "kind": kind,
            "actor": actor,
            "job": job,
            "detail": detail,
            "created_at": created_at.astimezone(UTC).isoformat(),
        }
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend.

    SQLite has no time zone type: store naive UTC there and re-attach UTC on
    read, so a timestamp round-trips to the same ISO string the audit hash saw.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the round store; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UInt64(TypeDecorator[int]):
    """Flower node ids are unsigned 64-bit; SQL BIGINT is signed.

    Map [0, 2**64) onto the signed range by two's complement, as Flower's own
    SQL link state does, so large node ids neither overflow nor change.
    """

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if not 0 <= value < 2**64:
            raise ValueError(f"node_id {value} is not an unsigned 64-bit integer")
        return value - 2**64 if value >= 2**63 else value

    def process_result_value(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return value + 2**64 if value < 0 else value


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention for Alembic."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class JobTable(Base):
    """A training job, found by its unique name when a coordinator restarts."""

    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint(_one_of("status", JOB_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    config: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class RoundTable(Base):
    """A committed round, or one failed attempt at it (``attempt`` counts them)."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("job_id", "number", "attempt"),
        # Failed attempts may repeat; a committed round exists at most once.
        Index(
            "uq_rounds_committed",
            "job_id",
            "number",
            unique=True,
            sqlite_where=text("status = 'committed'"),
            postgresql_where=text("status = 'committed'"),
        ),
        CheckConstraint("status IN ('committed', 'failed')", name="status"),
        CheckConstraint("number >= 1", name="number"),
        CheckConstraint("attempt >= 1", name="attempt"),
        CheckConstraint("num_participants >= 0", name="num_participants"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    number: Mapped[int]
    attempt: Mapped[int]
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime]
    committed_at: Mapped[datetime | None]
    total_weight: Mapped[float | None] = mapped_column(Float)
    num_participants: Mapped[int] = mapped_column(Integer, default=0)
    train_loss: Mapped[float | None] = mapped_column(Float)
    eval_accuracy: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    # The task's metrics pooled across the hospitals' evaluations, as JSON.
    eval_metrics: Mapped[str | None] = mapped_column(Text)
    evaluated_at: Mapped[datetime | None]

    participations: Mapped[list[ParticipationTable]] = relationship(
        cascade="all, delete-orphan", order_by="ParticipationTable.id"
    )


class ParticipationTable(Base):
    """A hospital in a round.

    ``status = 'evaluated'`` marks a hospital that only evaluated the round's
    model (it was not asked to train).
    """

    __tablename__ = "participations"
    __table_args__ = (
        UniqueConstraint("round_id", "hospital"),
        CheckConstraint(
            "status IN ('ok', 'refused', 'rejected', 'failed', 'evaluated')", name="status"
        ),
        CheckConstraint("samples >= 0", name="samples"),
        CheckConstraint("bytes_received >= 0", name="bytes_received"),
        CheckConstraint("eval_samples IS NULL OR eval_samples >= 0", name="eval_samples"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    hospital: Mapped[str] = mapped_column(String(200))
    node_id: Mapped[int] = mapped_column(UInt64, default=0)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    samples: Mapped[int] = mapped_column(Integer, default=0)
    train_loss: Mapped[float | None] = mapped_column(Float)
    epsilon: Mapped[float | None] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    noise_multiplier: Mapped[float | None] = mapped_column(Float)
    sample_rate: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int | None] = mapped_column(BigInteger)
    accountant: Mapped[str | None] = mapped_column(String(32))
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    eval_accuracy: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    eval_samples: Mapped[int | None] = mapped_column(Integer)
    # This hospital's own values of the task's metrics, as JSON.
    eval_metrics: Mapped[str | None] = mapped_column(Text)


class ModelTable(Base):
    """The global model after each committed round.

    Ciphertext (HE) or plaintext, with its SHA-256 so a corrupted blob is caught
    before a hospital decrypts it.

    ``at_rest`` says how ``blob`` is stored (see :mod:`.at_rest`); ``sha256`` is
    always that of the model itself, so the audit trail binds the same hash
    whether or not the store encrypts at rest.
    """

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("job_id", "round"),
        CheckConstraint("kind IN ('bfv', 'plain')", name="kind"),
        CheckConstraint(_one_of("at_rest", AT_REST_SCHEMES), name="at_rest"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    round: Mapped[int]
    kind: Mapped[str] = mapped_column(String(8))
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    total_weight: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime]
    at_rest: Mapped[str] = mapped_column(
        String(16), default=AT_REST_NONE, server_default=AT_REST_NONE
    )


class LedgerTable(Base):
    """Each hospital's cumulative (ε, δ) and DP parameters after a committed round.

    ``accountant_state`` is the accountant's JSON text, or (``at_rest`` =
    ``aes-256-gcm``) the base64 text of the sealed JSON.
    """

    __tablename__ = "privacy_ledger"
    __table_args__ = (
        UniqueConstraint("job_id", "hospital", "round"),
        CheckConstraint("epsilon >= 0", name="epsilon"),
        CheckConstraint("delta IS NULL OR (delta >= 0 AND delta < 1)", name="delta"),
        CheckConstraint(_one_of("at_rest", AT_REST_SCHEMES), name="at_rest"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    hospital: Mapped[str] = mapped_column(String(200))
    round: Mapped[int]
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    noise_multiplier: Mapped[float | None] = mapped_column(Float)
    sample_rate: Mapped[float | None] = mapped_column(Float)
    steps: Mapped[int | None] = mapped_column(BigInteger)
    accountant: Mapped[str | None] = mapped_column(String(32))
    accountant_state: Mapped[str | None] = mapped_column(Text)
    at_rest: Mapped[str] = mapped_column(
        String(16), default=AT_REST_NONE, server_default=AT_REST_NONE
    )


class StoreMetaTable(Base):
    """Store-wide facts by name, e.g. the id of the key that encrypts it at rest."""

    __tablename__ = "store_meta"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    value: Mapped[str] = mapped_column(Text)


class AuditTable(Base):
    """Hash-chained audit trail (see the module docstring for the hash)."""

    __tablename__ = "audit_events"
    # AUTOINCREMENT: SQLite must never reuse the id of a deleted (tampered) row.
    __table_args__ = (Index(None, "job_id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text)
    # UNIQUE: two writers that read the same head cannot both append to it.
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


# -- rows <-> records -------------------------------------------------------------

# Participation fields stored in `participations` (accountant_state is ledger-only;
# a refusal's code is what the coordinator decides on, its reason what is kept).
_PARTICIPATION_COLUMNS = tuple(
    f.name for f in fields(Participation) if f.name not in ("accountant_state", "code")
)
# Ledger columns a participation carries.
_LEDGER_COLUMNS = (*(f.name for f in fields(LedgerRow) if f.name != "round"), "accountant_state")


def participation_values(round_id: int, p: Participation) -> dict[str, Any]:
    """The columns of ``p``'s new ``participations`` row, for a bulk INSERT.

    Rows go in as one bulk statement per table, not as ORM objects: building and
    flushing hundreds of objects was most of a round's commit.
    """
    return {"round_id": round_id, **{name: getattr(p, name) for name in _PARTICIPATION_COLUMNS}}


def participation_record(row: Any, accountant_state: str | None) -> Participation:
    """The record of a stored participation row (with its ledger's accountant state)."""
    values = {name: getattr(row, name) for name in _PARTICIPATION_COLUMNS}
    return Participation(**values, accountant_state=accountant_state)


def ledger_values(job_id: int, round_number: int, p: Participation) -> dict[str, Any]:
    """The columns of the ``privacy_ledger`` row of an ``ok`` participation that reported ε."""
    values = {name: getattr(p, name) for name in _LEDGER_COLUMNS}
    return {"job_id": job_id, "round": round_number, "at_rest": AT_REST_NONE, **values}


def job_record(row: JobTable) -> Job:
    """The record of a stored job, its config parsed back from JSON."""
    return Job(
        id=row.id,
        name=row.name,
        config=json.loads(row.config),
        status=row.status,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def ledger_record(row: Any) -> LedgerRow:
    """The record of a privacy-ledger row (an ORM object or a Core row: read by column name)."""
    return LedgerRow(*(getattr(row, f.name) for f in fields(LedgerRow)))


def audit_record(row: AuditTable, job_name: str | None) -> AuditRow:
    """The record of a stored audit event."""
    detail = json.loads(row.detail)
    return AuditRow(
        row.id, job_name, row.created_at, row.kind, row.actor, detail, row.prev_hash, row.hash
    )


def round_view(
    r: RoundTable,
    participations: Sequence[Any],
    states: Mapping[tuple[str, int], str | None],
) -> RoundView:
    """The record of a stored round.

    ``participations``: its ``participations`` rows in id order (ORM objects or
    Core rows: read by column name); ``states`` maps (hospital, round) to
    accountant state.
    """
    committed = r.status == "committed"
    return RoundView(
        number=r.number,
        status=r.status,
        reason=r.reason,
        attempt=r.attempt,
        total_weight=r.total_weight,
        num_participants=r.num_participants,
        train_loss=r.train_loss,
        eval_accuracy=r.eval_accuracy,
        eval_loss=r.eval_loss,
        eval_metrics=json.loads(r.eval_metrics) if r.eval_metrics else {},
        committed_at=r.committed_at,
        started_at=r.started_at,
        participations=tuple(
            participation_record(p, states.get((p.hospital, r.number)) if committed else None)
            for p in participations
            if p.status != "evaluated"
        ),
        evaluations=tuple(
            HospitalEval(
                hospital=p.hospital,
                accuracy=p.eval_accuracy,
                loss=p.eval_loss,
                samples=p.eval_samples,
                metrics=json.loads(p.eval_metrics) if p.eval_metrics else {},
            )
            for p in sorted(participations, key=lambda p: p.hospital)
            if p.eval_loss is not None and p.eval_samples is not None
        ),
    )


# -- the audit chain ----------------------------------------------------------------


def append_audit_events(s: Session, job: JobTable | None, events: Sequence[AuditEvent]) -> None:
    """Chain ``events`` onto the audit trail inside the caller's transaction.

    The caller holds the writer lock, so the head read here stays the head; the
    UNIQUE ``prev_hash`` turns any race that slipped through into an error
    instead of a fork.
    """
    prev = s.scalar(select(AuditTable.hash).order_by(AuditTable.id.desc()).limit(1))
    prev = prev or GENESIS_HASH
    now = utcnow()
    job_name = job.name if job is not None else None
    for event in events:
        try:
            detail_text = canonical_json(dict(event.detail))
        except (TypeError, ValueError) as exc:
            raise StoreError(
                f"audit event {event.kind!r} has a detail that is not plain JSON ({exc}); "
                "pass str/int/finite float/bool/None/list/dict values"
            ) from exc
        detail = json.loads(detail_text)
        digest = audit_hash(
            prev, kind=event.kind, actor=event.actor, job=job_name, detail=detail, created_at=now
        )
        s.add(
            AuditTable(
                job_id=job.id if job is not None else None,
                created_at=now,
                kind=event.kind,
                actor=event.actor,
                detail=detail_text,
                prev_hash=prev,
                hash=digest,
            )
        )
        s.flush()  # ids must follow chain order
        prev = digest


def audit_query(job_id: int | None = None) -> Select[AuditTable, str]:
    """Audit rows with their job's name, in chain order."""
    stmt = (
        select(AuditTable, JobTable.name)
        .outerjoin(JobTable, AuditTable.job_id == JobTable.id)
        .order_by(AuditTable.id)
    )
    return stmt if job_id is None else stmt.where(AuditTable.job_id == job_id)


def first_broken_link(s: Session) -> int | None:
    """Re-walk the whole chain; return the id of the first broken link, or None.

    A link is broken when its ``prev_hash`` is not the previous row's hash or its
    own hash does not match its content. Deleting the newest rows leaves a
    shorter, valid chain: anchor the head elsewhere to catch that.
    """
    prev = GENESIS_HASH
    for row, job_name in s.execute(audit_query().execution_options(yield_per=500)):
        try:
            detail = json.loads(row.detail)
        except ValueError:
            return row.id
        expected = audit_hash(
            prev,
            kind=row.kind,
            actor=row.actor,
            job=job_name,
            detail=detail,
            created_at=row.created_at,
        )
        if row.prev_hash != prev or row.hash != expected:
            return row.id
        prev = row.hash
    return None
