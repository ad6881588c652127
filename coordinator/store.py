"""The coordinator's durable round store (SQLAlchemy 2; SQLite or PostgreSQL).

A round is committed whole or not at all: round row, participations, new global
model, privacy-ledger rows and audit events go in ONE transaction, and the store
refuses any round but ``last committed + 1``, so a crash or a retry can neither
lose a round nor apply one twice. A restarted coordinator finds its job by name
(:meth:`RoundStore.open_job`) and resumes from :meth:`RoundStore.latest_model`.

Writers serialise (see :mod:`.store_engine`): SQLite write transactions start
with ``BEGIN IMMEDIATE``, PostgreSQL ones take a transaction advisory lock; file
databases run in WAL mode with ``synchronous=FULL``. The unique constraints in
:mod:`.store_models` back all of this up at the database level.

Opening a store brings its schema to the newest revision (Alembic, see
:mod:`.migrations`) and refuses a store written by a newer fedvault. With an
``at_rest_key`` the store encrypts what the coordinator could otherwise read
(plaintext models, accountant states) with AES-256-GCM (:mod:`.at_rest`),
records the key's id, and refuses another key; Ciphertexts are stored as
they are. Each such row says how it is stored (``at_rest``), so rows written
without a key stay readable after a key is configured.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import Engine, LargeBinary, String, delete, func, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session

from fedvault.errors import FedvaultError, InvalidConfigError, StoreError

from .at_rest import AT_REST_NONE, AtRestCipher, RowSealer, model_context, state_context
from .migrations import current_revision
from .records import (
    AuditEvent,
    AuditRow,
    HospitalEval,
    Job,
    LedgerRow,
    ModelBlob,
    Participation,
    RoundCommit,
    RoundView,
)
from .store_engine import (
    PG_WRITER_LOCK,
    WRITE_OPTION,
    create_store_engine,
    db_reason,
    open_schema,
    sqlite_url,
)
from .store_models import (
    JOB_STATUSES,
    AuditTable,
    Base,
    JobTable,
    LedgerTable,
    ModelTable,
    ParticipationTable,
    RoundTable,
    append_audit_events,
    audit_query,
    audit_record,
    canonical_json,
    first_broken_link,
    job_record,
    ledger_record,
    ledger_values,
    participation_values,
    round_view,
    utcnow,
)

#: What operators asked of a job (:meth:`RoundStore.requested_control`).
JobControl = Literal["run", "pause", "stop"]

__all__ = ["DEFAULT_STORE_FILENAME", "JOB_STATUSES", "JobControl", "RoundStore", "sqlite_url"]

DEFAULT_STORE_FILENAME = "fedvault.sqlite"
ACTOR = "coordinator"
_UNSET = object()


def _conflict(name: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> StoreError:
    keys = sorted(
        k for k in stored.keys() | wanted.keys() if stored.get(k, _UNSET) != wanted.get(k, _UNSET)
    )

    def show(config: Mapping[str, Any]) -> str:
        return ", ".join(f"{k}={json.dumps(config[k]) if k in config else '<unset>'}" for k in keys)

    return StoreError(
        f"job {name!r} already exists in this store with {show(stored)} (this run asks for "
        f"{show(wanted)}); use another --out/--store or the same settings to resume"
    )


class RoundStore:
    """Durable state of the coordinator's jobs and rounds.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///PATH`` (see :func:`sqlite_url`), ``sqlite://``
        for an in-memory store, or ``postgresql+psycopg://USER@HOST/DB``.
    at_rest_key
        The coordinator kit's 32-byte at-rest key (:meth:`fedvault.kit.Kit.at_rest_key`),
        or ``None`` (simulation; read-only tooling). A store once opened with a
        key refuses any other key, and refuses to store plaintext models or
        accountant states for an opener without one.
    engine_kwargs
        Extra :func:`sqlalchemy.create_engine` arguments, e.g.
        ``{"connect_args": {"options": "-csearch_path=myschema"}}`` (the tables
        and Alembic's version table live in the first schema of the search path).

    Raises
    ------
    StoreError
        The store is unreachable, was written by a newer fedvault, or is not a
        fedvault store.
    KeyMismatchError
        The store is encrypted at rest under another key.
    """

    def __init__(
        self,
        url: str,
        *,
        at_rest_key: bytes | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        cipher = None if at_rest_key is None else AtRestCipher(at_rest_key)
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise StoreError(
                f"{url!r} is not a database URL; pass e.g. sqlite:///PATH/{DEFAULT_STORE_FILENAME} "
                "or postgresql+psycopg://USER@HOST/DB"
            ) from exc
        self._url = parsed.render_as_string(hide_password=True)
        self._postgres = parsed.get_backend_name() == "postgresql"
        try:
            self._engine = create_store_engine(parsed, engine_kwargs)
        except ImportError as exc:
            raise StoreError(
                f"no database driver for {self._url} ({exc}); install it, e.g. "
                "`pip install 'fedvault[postgres]'` for PostgreSQL"
            ) from exc
        try:
            key_id = None if cipher is None else cipher.key_id
            self._key_id = open_schema(self._engine, where=self._url, key_id=key_id)
        except SQLAlchemyError as exc:
            self._engine.dispose()
            reason = db_reason(exc)
            if parsed.password:
                reason = reason.replace(parsed.password, "***")
            raise StoreError(
                f"cannot open the round store at {self._url}: {reason}. Check that the database "
                "server is running and reachable, that the credentials are right, or that the "
                "file's directory exists and is writable; or pass another --store URL"
            ) from exc
        except FedvaultError:
            self._engine.dispose()
            raise
        self._sealer = RowSealer(cipher, self._key_id, self._url)

    @property
    def encrypts_at_rest(self) -> bool:
        """Whether this store seals plaintext models and accountant states."""
        return self._sealer.encrypts

    @property
    def at_rest_key_id(self) -> str | None:
        """Id of the key the store is encrypted under (``None``: never was)."""
        return self._key_id

    def schema_revision(self) -> str | None:
        """The store's schema revision (the head revision once opened)."""
        with self._engine.connect() as conn:
            return current_revision(conn)

    @property
    def engine(self) -> Engine:
        """The underlying engine (for migrations and operator tooling)."""
        return self._engine

    def close(self) -> None:
        """Release every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> RoundStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _session(self, what: str, *, write: bool = False) -> Iterator[Session]:
        """One transaction; database errors become a StoreError naming ``what``."""
        try:
            with Session(self._engine) as s, s.begin():
                if write:
                    s.connection(execution_options={WRITE_OPTION: True})
                    if self._postgres:
                        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_WRITER_LOCK})
                elif self._postgres:
                    # One snapshot for all of a read's queries, as SQLite's BEGIN gives.
                    s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                yield s
        except SQLAlchemyError as exc:
            done = " The transaction was rolled back: nothing was written." if write else ""
            raise StoreError(
                f"could not {what} in the round store at {self._url}: {db_reason(exc)}.{done} "
                "Check that the store is reachable, that no other coordinator writes this job, "
                "and that the data obeys the rule the database names."
            ) from exc

    def _job_row(self, s: Session, job_id: int) -> JobTable:
        row = s.get(JobTable, job_id)
        if row is None:
            raise StoreError(
                f"no job with id {job_id} in {self._url}; open it with open_job() first"
            )
        return row

    @staticmethod
    def _log(s: Session, job: JobTable, kind: str, **detail: Any) -> None:
        append_audit_events(s, job, [AuditEvent(kind=kind, actor=ACTOR, detail=detail)])

    @staticmethod
    def _last_committed(s: Session, job_id: int) -> int:
        last = s.scalar(
            select(func.max(RoundTable.number)).where(
                RoundTable.job_id == job_id, RoundTable.status == "committed"
            )
        )
        return int(last or 0)

    def _next_attempt(self, s: Session, job: JobTable, number: int) -> int:
        """Check that ``number`` is the next round and return its attempt number."""
        last = self._last_committed(s, job.id)
        if number != last + 1:
            raise StoreError(
                f"refusing round {number} of job {job.name!r}: the last committed round is {last}, "
                f"so the next one must be {last + 1} (a round may be neither skipped nor applied "
                f"twice); resume from round {last + 1}"
            )
        attempts = s.scalar(
            select(func.max(RoundTable.attempt)).where(
                RoundTable.job_id == job.id, RoundTable.number == number
            )
        )
        return int(attempts or 0) + 1

    # -- jobs ---------------------------------------------------------------------

    def open_job(self, name: str, config: Mapping[str, object], *, status: str = "running") -> Job:
        """Create job ``name`` (as ``status``), or return it to resume when ``config`` is unchanged.

        Raises
        ------
        StoreError
            The job exists with other settings (the keys that differ are named).
        """
        if not name or len(name) > 200:
            raise InvalidConfigError(f"job name {name!r} must be 1 to 200 characters")
        try:
            config_text = canonical_json(dict(config))
        except (TypeError, ValueError) as exc:
            raise InvalidConfigError(
                f"job config is not plain JSON ({exc}); "
                "pass str/int/finite float/bool/list/dict values"
            ) from exc
        wanted = json.loads(config_text)
        with self._session(f"open job {name!r}", write=True) as s:
            row = s.scalars(select(JobTable).where(JobTable.name == name)).one_or_none()
            if row is None:
                now = utcnow()
                row = JobTable(
                    name=name, config=config_text, status=status, created_at=now, updated_at=now
                )
                s.add(row)
                s.flush()
                self._log(s, row, "job.created", config=wanted)
            else:
                stored = json.loads(row.config)
                if stored != wanted:
                    raise _conflict(name, stored, wanted)
                last = self._last_committed(s, row.id)
                self._log(s, row, "job.resumed", last_committed_round=last, status=row.status)
            return job_record(row)

    def get_job(self, name: str) -> Job | None:
        """Return job ``name``, or ``None`` when this store has none by that name."""
        with self._session(f"read job {name!r}") as s:
            row = s.scalars(select(JobTable).where(JobTable.name == name)).one_or_none()
            return None if row is None else job_record(row)

    def list_jobs(self) -> list[Job]:
        """Every job in this store, oldest first."""
        with self._session("list the jobs") as s:
            rows = s.scalars(select(JobTable).order_by(JobTable.id)).all()
            return [job_record(r) for r in rows]

    def set_job_status(self, job_id: int, status: str) -> None:
        """Set a job's status (one of :data:`JOB_STATUSES`), with an audit event."""
        if status not in JOB_STATUSES:
            raise InvalidConfigError(f"job status {status!r} is not one of {JOB_STATUSES}")
        with self._session(f"set the status of job {job_id}", write=True) as s:
            job = self._job_row(s, job_id)
            job.status = status
            job.updated_at = utcnow()
            self._log(s, job, "job.status", status=status)

    # -- the job queue of a coordinator service -------------------------------------

    def submit_job(self, name: str, config: Mapping[str, object]) -> Job:
        """Queue job ``name`` behind the jobs queued before it; return it.

        A new name is stored ``queued``. A ``stopped`` or ``failed`` job with the
        same settings is queued again (it resumes after its last committed
        round); a ``queued``, ``running`` or ``finished`` one is returned as it is.

        Raises
        ------
        StoreError
            The job exists with other settings (the keys that differ are named).
        """
        existed = self.get_job(name) is not None
        job = self.open_job(name, config, status="queued")  # or checks its settings
        if not existed or job.status not in ("stopped", "failed"):
            return job
        with self._session(f"queue job {name!r}", write=True) as s:
            row = self._job_row(s, job.id)
            row.status = "queued"
            row.updated_at = utcnow()  # the queue's order
            self._log(s, row, "job.status", status="queued")
            return job_record(row)

    def job_queue(self) -> list[Job]:
        """The jobs a coordinator service runs next, in order.

        A ``running`` job first (its coordinator was stopped or crashed; it
        resumes), then the ``queued`` ones, longest waiting first.
        """
        with self._session("read the job queue") as s:
            rows = s.scalars(
                select(JobTable)
                .where(JobTable.status.in_(("running", "queued")))
                .order_by(JobTable.updated_at, JobTable.id)
            ).all()
            jobs = [job_record(r) for r in rows]
        return sorted(jobs, key=lambda j: j.status != "running")  # stable: keeps the order

    # -- rounds -------------------------------------------------------------------

    def last_committed_round(self, job_id: int) -> int:
        """Number of the job's last committed round; 0 before the first."""
        with self._session(f"read the rounds of job {job_id}") as s:
            self._job_row(s, job_id)
            return self._last_committed(s, job_id)

    def commit_round(self, job_id: int, commit: RoundCommit) -> None:
        """Commit a whole round in one transaction, or nothing.

        Writes the round row, its participations, the new model (with its
        SHA-256; a plaintext model and the accountant states are encrypted at
        rest when the store has a key), a privacy-ledger row for every ``ok`` participation that
        reported ε, a ``round.committed`` audit event binding the model hash,
        then ``commit.audit``.

        Raises
        ------
        StoreError
            ``commit.number`` is not the last committed round + 1, the
            database refused a row, or the store is encrypted at rest and was
            opened without its key; nothing was written.
        """
        what = f"commit round {commit.number} of job {job_id}"
        with self._session(what, write=True) as s:
            job = self._job_row(s, job_id)
            attempt = self._next_attempt(s, job, commit.number)
            now = utcnow()
            ok = [p for p in commit.participations if p.status == "ok"]
            model = commit.model
            rnd = RoundTable(
                job_id=job.id,
                number=commit.number,
                attempt=attempt,
                status="committed",
                reason="",
                started_at=commit.started_at or now,
                committed_at=now,
                total_weight=model.total_weight,
                num_participants=len(ok),
                train_loss=commit.train_loss,
            )
            _add_round(s, rnd, commit.participations)
            sha256 = self._add_model(s, job, commit.number, model, now)
            ledger = []
            for p in ok:
                if p.epsilon is None:
                    continue
                row = ledger_values(job.id, commit.number, p)
                if p.accountant_state is not None:
                    context = state_context(job.id, p.hospital, commit.number)
                    row["accountant_state"], row["at_rest"] = self._sealer.seal_text(
                        p.accountant_state, context
                    )
                ledger.append(row)
            _insert(s, LedgerTable, ledger)
            job.updated_at = now
            detail = {
                "round": commit.number,
                "attempt": attempt,
                "model_kind": model.kind,
                "model_sha256": sha256,
                "total_weight": model.total_weight,
                "participants": sorted(p.hospital for p in ok),
            }
            committed = AuditEvent(kind="round.committed", actor=ACTOR, detail=detail)
            append_audit_events(s, job, [committed, *commit.audit])
            if commit.previous_evaluations and commit.number > 1:
                s.flush()
                self._evaluate(
                    s, job, commit.number - 1, commit.previous_evaluations, commit.previous_pooled
                )

    def _add_model(self, s: Session, job: JobTable, number: int, model: ModelBlob, now: Any) -> str:
        """Add a model row (sealed at rest unless already ciphertext); returns its SHA-256."""
        sha256 = hashlib.sha256(model.blob).hexdigest()
        blob, at_rest = model.blob, AT_REST_NONE  # HE: already ciphertext
        if model.kind == "plain":
            blob, at_rest = self._sealer.seal(model.blob, model_context(job.id, number))
        s.add(
            ModelTable(
                job_id=job.id,
                round=number,
                kind=model.kind,
                blob=blob,
                sha256=sha256,
                total_weight=model.total_weight,
                created_at=now,
                at_rest=at_rest,
            )
        )
        return sha256

    def save_initial_model(self, job_id: int, model: ModelBlob) -> ModelBlob:
        """Keep the round-0 model once, and return the stored one.

        The initial model is encrypted with fresh randomness: re-creating it after
        a crash would change its bytes, and hospitals (which replay an answered
        round only for the identical model) would train round 1 again and spend
        privacy twice. So the first one is stored and reused.
        """
        with self._session(f"save the initial model of job {job_id}", write=True) as s:
            job = self._job_row(s, job_id)
            exists = s.scalar(
                select(func.count()).select_from(ModelTable).where(ModelTable.job_id == job.id)
            )
            if not exists:
                self._add_model(s, job, 0, model, utcnow())
        stored = self.latest_model(job_id)
        assert stored is not None
        return stored

    def record_failed_round(
        self,
        job_id: int,
        number: int,
        *,
        reason: str,
        participations: Sequence[Participation],
        started_at: datetime | None = None,
    ) -> None:
        """Record one failed attempt at round ``number`` (the next round), audited.

        ``started_at`` is when the attempt started (default: now).

        Attempts are numbered; the round may later be committed as the next
        attempt. No ledger rows are written: a hospital's ε is cumulative, so
        the next committed round's ledger row includes what this attempt spent.
        """
        with self._session(f"record failed round {number} of job {job_id}", write=True) as s:
            job = self._job_row(s, job_id)
            attempt = self._next_attempt(s, job, number)
            rnd = RoundTable(
                job_id=job.id,
                number=number,
                attempt=attempt,
                status="failed",
                reason=reason,
                started_at=started_at or utcnow(),
                num_participants=sum(p.status == "ok" for p in participations),
            )
            _add_round(s, rnd, participations)
            statuses = {p.hospital: p.status for p in participations}
            self._log(
                s,
                job,
                "round.failed",
                round=number,
                attempt=attempt,
                reason=reason,
                statuses=statuses,
            )

    def record_evaluation(
        self,
        job_id: int,
        number: int,
        *,
        evaluations: Sequence[HospitalEval],
        pooled: Mapping[str, float] | None = None,
    ) -> None:
        """Store the hospitals' evaluation of committed round ``number``.

        The round gets the sample-weighted accuracy and loss; each hospital's
        own numbers go on its participation (a row with status ``evaluated`` for
        a hospital that did not train). Recording again replaces the previous
        evaluation, so a resumed coordinator may re-evaluate safely; recording
        none (no hospital answered) leaves the round unevaluated.
        """
        with self._session(f"record the evaluation of round {number}", write=True) as s:
            self._evaluate(s, self._job_row(s, job_id), number, evaluations, pooled or {})

    def _evaluate(
        self,
        s: Session,
        job: JobTable,
        number: int,
        evaluations: Sequence[HospitalEval],
        pooled: Mapping[str, float],
    ) -> None:
        hospitals = [e.hospital for e in evaluations]
        if len(set(hospitals)) != len(hospitals):
            raise StoreError(
                f"evaluation of round {number} must name each hospital once, got {hospitals}; "
                "keep one evaluation per hospital"
            )
        rnd = s.scalars(
            select(RoundTable).where(
                RoundTable.job_id == job.id,
                RoundTable.number == number,
                RoundTable.status == "committed",
            )
        ).one_or_none()
        if rnd is None:
            raise StoreError(
                f"round {number} of job {job.name!r} is not committed; "
                "evaluate committed rounds only"
            )
        _evaluate_participations(s, rnd.id, evaluations)
        total = sum(e.samples for e in evaluations)  # each >= 1: 0 only when empty
        scored = [e for e in evaluations if e.accuracy is not None]  # none for regression
        scored_total = sum(e.samples for e in scored)
        rnd.eval_accuracy = (
            sum(e.accuracy * e.samples for e in scored if e.accuracy is not None) / scored_total
            if scored_total
            else None
        )
        rnd.eval_loss = sum(e.loss * e.samples for e in evaluations) / total if total else None
        rnd.eval_metrics = _metrics_json(pooled) if total else None
        rnd.evaluated_at = utcnow()
        self._log(
            s,
            job,
            "round.evaluated",
            round=number,
            hospitals=sorted(e.hospital for e in evaluations),
            accuracy=rnd.eval_accuracy,
            loss=rnd.eval_loss,
            metrics=dict(pooled) if total else {},
        )

    def latest_model(self, job_id: int) -> ModelBlob | None:
        """The model of the last committed round (integrity-checked), or ``None``.

        Raises
        ------
        StoreError
            The model was corrupted or tampered with, or it is encrypted at rest
            and this store has no key.
        KeyMismatchError
            It was encrypted under another key.
        """
        with self._session(f"read the latest model of job {job_id}") as s:
            self._job_row(s, job_id)
            row = s.scalars(
                select(ModelTable)
                .where(ModelTable.job_id == job_id)
                .order_by(ModelTable.round.desc())
                .limit(1)
            ).one_or_none()
            return None if row is None else self._model_blob(job_id, row)

    def model(self, job_id: int, number: int) -> ModelBlob | None:
        """The global model of round ``number`` (0: the initial model), or ``None``.

        Every committed round keeps its model, so any of them can be exported
        later; it is integrity-checked exactly as :meth:`latest_model` checks
        the newest one.

        Raises
        ------
        StoreError
            The model was corrupted or tampered with, or it is encrypted at rest
            and this store has no key.
        KeyMismatchError
            It was encrypted under another key.
        """
        with self._session(f"read the model of round {number} of job {job_id}") as s:
            self._job_row(s, job_id)
            row = s.scalars(
                select(ModelTable).where(ModelTable.job_id == job_id, ModelTable.round == number)
            ).one_or_none()
            return None if row is None else self._model_blob(job_id, row)

    def _model_blob(self, job_id: int, row: ModelTable) -> ModelBlob:
        """A stored model, opened (at rest) and checked against its SHA-256."""
        blob = self._sealer.open(row.blob, row.at_rest, model_context(job_id, row.round))
        if hashlib.sha256(blob).hexdigest() != row.sha256:
            raise StoreError(
                f"the stored model of round {row.round} (job {job_id}) does not match its "
                "SHA-256: the store was corrupted or tampered with; restore it from a backup"
            )
        return ModelBlob(row.round, row.kind, blob, row.total_weight)  # type: ignore[arg-type]

    def model_rounds(self, job_id: int) -> list[int]:
        """The rounds whose model the store holds, ascending (0: the initial model)."""
        with self._session(f"list the models of job {job_id}") as s:
            self._job_row(s, job_id)
            rounds = s.scalars(
                select(ModelTable.round)
                .where(ModelTable.job_id == job_id)
                .order_by(ModelTable.round)
            ).all()
            return [int(r) for r in rounds]

    def rounds(self, job_id: int, *, after: int = 0) -> list[RoundView]:
        """Every committed round and failed attempt numbered above ``after``.

        Ordered by (number, attempt); 3 queries.

        A participation's ``accountant_state`` is ``None`` when it is encrypted
        at rest and this store was opened without the key (read-only tooling).
        """
        with self._session(f"read the rounds of job {job_id}") as s:
            self._job_row(s, job_id)
            rows = s.scalars(
                select(RoundTable)
                .where(RoundTable.job_id == job_id, RoundTable.number > after)
                .order_by(RoundTable.number, RoundTable.attempt)
            ).all()
            # Plain rows, not ORM objects: hundreds per round, only read.
            participations: dict[int, list[Any]] = {r.id: [] for r in rows}
            for p in s.execute(
                select(*ParticipationTable.__table__.c)
                .join(RoundTable, RoundTable.id == ParticipationTable.round_id)
                .where(RoundTable.job_id == job_id, RoundTable.number > after)
                .order_by(ParticipationTable.id)
            ):
                participations[p.round_id].append(p)
            states = {
                (hospital, number): None
                if state is None
                else self._sealer.open_text(state, at_rest, state_context(job_id, hospital, number))
                for hospital, number, state, at_rest in s.execute(
                    select(
                        LedgerTable.hospital,
                        LedgerTable.round,
                        LedgerTable.accountant_state,
                        LedgerTable.at_rest,
                    ).where(LedgerTable.job_id == job_id, LedgerTable.round > after)
                )
            }
            return [round_view(r, participations[r.id], states) for r in rows]

    def ledger(self, job_id: int, *, after: int = 0) -> list[LedgerRow]:
        """The job's privacy ledger after round ``after``, by round then hospital.

        ε is cumulative.
        """
        with self._session(f"read the privacy ledger of job {job_id}") as s:
            self._job_row(s, job_id)
            rows = s.execute(
                select(*LedgerTable.__table__.c)
                .where(LedgerTable.job_id == job_id, LedgerTable.round > after)
                .order_by(LedgerTable.round, LedgerTable.hospital)
            )
            return [ledger_record(r) for r in rows]

    # -- audit --------------------------------------------------------------------

    def append_audit(self, event: AuditEvent, *, job_id: int | None = None) -> None:
        """Append one event to the hash chain (store-wide when ``job_id`` is None)."""
        with self._session(f"append audit event {event.kind!r}", write=True) as s:
            job = None if job_id is None else self._job_row(s, job_id)
            append_audit_events(s, job, [event])

    def requested_control(self, job_name: str) -> JobControl:
        """What operators asked of a job: ``"run"``, ``"pause"`` or ``"stop"``.

        The round loop calls this after each committed round (and before the
        first): on ``"stop"`` it ends the loop *without* setting the job to
        ``finished`` (the stored status is already ``stopped``); on ``"pause"`` it
        polls again every few seconds until the answer changes. A pause is the
        latest ``operator_action`` event of the job whose action is ``pause`` or
        ``resume``; the store keeps no ``paused`` status.
        """
        job = self.get_job(job_name)
        if job is None:
            raise StoreError(
                f"no job {job_name!r} in the round store; open it with open_job() first"
            )
        if job.status == "stopped":
            return "stop"
        # Only the job's operator actions, newest first: the loop asks before every
        # round, and reading the whole trail grew with rounds x hospitals.
        with self._session("read the operator actions") as s:
            actions = s.scalars(
                select(AuditTable.detail)
                .where(AuditTable.job_id == job.id, AuditTable.kind == "operator_action")
                .order_by(AuditTable.id.desc())
            )
            for detail in actions:
                action = json.loads(detail).get("action")
                if action in ("pause", "resume"):
                    return "pause" if action == "pause" else "run"
        return "run"

    def audit_events(self, job_id: int | None = None) -> list[AuditRow]:
        """Audit events in chain order, all or one job's."""
        with self._session("read the audit trail") as s:
            return [audit_record(r, name) for r, name in s.execute(audit_query(job_id))]

    def verify_audit_chain(self) -> int | None:
        """Re-walk the hash chain: the id of the first broken link, or ``None`` if intact.

        See :func:`.store_models.first_broken_link`.
        """
        with self._session("verify the audit trail") as s:
            return first_broken_link(s)

    def iter_blobs(self) -> Iterator[tuple[str, bytes]]:
        """Yield ``("table.column#id", bytes)`` for every binary and text value stored.

        Covers every LargeBinary and String/Text/JSON column of every table, so
        a test can prove that no HE secret key (or other secret) is stored.
        """
        with self._session("scan the stored values") as s:
            for table in Base.metadata.sorted_tables:
                columns = [c for c in table.columns if isinstance(c.type, String | LargeBinary)]
                stmt = select(table.c.id, *columns).order_by(table.c.id)
                for row in s.execute(stmt.execution_options(yield_per=100)):
                    for column, value in zip(columns, row[1:], strict=True):
                        if value is not None:
                            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                            yield f"{table.name}.{column.name}#{row[0]}", data


def _metrics_json(metrics: Mapping[str, float]) -> str | None:
    """Metrics as JSON text (``None`` when there are none); NaN cannot be stored."""
    if not metrics:
        return None
    for name, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise StoreError(
                f"metric {name!r} = {value!r} is not a finite number; drop it before storing"
            )
    return json.dumps(dict(sorted(metrics.items())), allow_nan=False)


def _insert(s: Session, table: type[Base], rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` as one bulk statement (executemany), inside ``s``."""
    if rows:
        s.execute(insert(table), list(rows))


def _add_round(s: Session, rnd: RoundTable, participations: Sequence[Participation]) -> None:
    """Add round row ``rnd`` and its participations' rows, in ``participations``' order."""
    s.add(rnd)
    s.flush()  # the round's id, which its participations' rows carry
    _insert(s, ParticipationTable, [participation_values(rnd.id, p) for p in participations])


def _evaluate_participations(
    s: Session, round_id: int, evaluations: Sequence[HospitalEval]
) -> None:
    """Put each hospital's evaluation on its participation in round ``round_id``.

    A hospital that did not train gets a row of status ``evaluated``; an
    evaluation recorded before and not repeated now is removed (``evaluated``
    rows) or cleared. Bulk statements by primary key: a round has one row per
    hospital, hundreds in a large consortium.
    """
    rows = {
        r.hospital: r
        for r in s.execute(
            select(
                ParticipationTable.id, ParticipationTable.hospital, ParticipationTable.status
            ).where(ParticipationTable.round_id == round_id)
        )
    }
    wanted = {e.hospital for e in evaluations}
    stale = [r.id for h, r in rows.items() if h not in wanted and r.status == "evaluated"]
    cleared = [
        {
            "id": r.id,
            "eval_accuracy": None,
            "eval_loss": None,
            "eval_samples": None,
            "eval_metrics": None,
        }
        for h, r in rows.items()
        if h not in wanted and r.status != "evaluated"
    ]
    scores = {
        e.hospital: {
            "eval_accuracy": e.accuracy,
            "eval_loss": e.loss,
            "eval_samples": e.samples,
            "eval_metrics": _metrics_json(e.metrics),
        }
        for e in evaluations
    }
    if stale:
        s.execute(delete(ParticipationTable).where(ParticipationTable.id.in_(stale)))
    updates = cleared + [{"id": rows[h].id, **v} for h, v in scores.items() if h in rows]
    if updates:
        s.execute(update(ParticipationTable), updates)
    new = [
        {"round_id": round_id, "hospital": h, "status": "evaluated", **v}
        for h, v in scores.items()
        if h not in rows
    ]
    _insert(s, ParticipationTable, new)
