"""The hospital's own privacy ledger: a SQLite file in its state directory.

The hospital, not the coordinator, is the authority on its own privacy budget.
Before each round the agent asks :meth:`LocalLedger.check_round` whether the
round's DP-SGD steps fit the budget *summed over every job* that has touched
this hospital's data (sequential composition: two jobs on the same records
spend from one budget). After training, :meth:`LocalLedger.record_round`
appends the job's new accountant state in one transaction, before the update
may leave the hospital.

Rows are only ever appended. A round trained twice (a retry after a crash)
costs privacy twice, so each training run is its own row, keyed by
``(job, server_round, attempt)``; nothing is overwritten.

Pure persistence: this module does not import Flower.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import SQLAlchemyError

from fedvault.errors import (
    BudgetExhaustedError,
    InvalidConfigError,
    MalformedUpdateError,
    StoreError,
)
from fedvault.privacy.dp import AccountantName, AccountantState

__all__ = ["LedgerEntry", "LocalLedger"]

_TOLERANCE = 1e-9

_metadata = MetaData()
_rounds = Table(
    "local_privacy_ledger",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("hospital", String(128), nullable=False),
    Column("job", String(128), nullable=False),
    Column("server_round", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("noise_multiplier", Float, nullable=False),
    Column("sample_rate", Float, nullable=False),
    Column("steps", Integer, nullable=False),
    Column("accountant", String(16), nullable=False),
    Column("state_json", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("job", "server_round", "attempt", name="uq_job_round_attempt"),
)


@dataclass(frozen=True)
class LedgerEntry:
    """One training run, as recorded.

    ``epsilon`` is the job's cumulative epsilon after this run (at ``delta``);
    ``steps`` are the DP-SGD steps this run added, taken with
    ``noise_multiplier`` and ``sample_rate``; ``attempt`` counts re-trainings
    of the same round (1 for the first).
    """

    job: str
    server_round: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    recorded_at: datetime
    attempt: int = 1


def _entry(row: Row[Any]) -> LedgerEntry:
    recorded_at = row.recorded_at
    if recorded_at.tzinfo is None:  # SQLite drops the zone; we always store UTC
        recorded_at = recorded_at.replace(tzinfo=UTC)
    return LedgerEntry(
        job=row.job,
        server_round=row.server_round,
        epsilon=row.epsilon,
        delta=row.delta,
        noise_multiplier=row.noise_multiplier,
        sample_rate=row.sample_rate,
        steps=row.steps,
        accountant=row.accountant,
        recorded_at=recorded_at,
        attempt=row.attempt,
    )


def _new_steps(
    job: str, before: AccountantState, after: AccountantState
) -> tuple[float, float, int]:
    """(nm, sr, steps) that ``after`` adds to ``before``; refuse a state that forgets steps.

    A state that does not extend the recorded one would silently drop
    privacy spend (e.g. a fresh accountant per round), so it is refused.
    """
    old, new = before.history, after.history
    extends = len(new) >= len(old) and new[: max(len(old) - 1, 0)] == old[:-1]
    if extends and old:
        last_old, same = old[-1], new[len(old) - 1]
        extends = same[:2] == last_old[:2] and same[2] >= last_old[2]
    added = after.steps - before.steps
    if not extends or added < 1:
        raise InvalidConfigError(
            f"the accountant state for job {job!r} ({after.steps} steps) does not extend "
            f"the recorded one ({before.steps} steps) by at least one step; restore the "
            "accountant from LocalLedger.state(job) before training, then record once"
        )
    if before.accountant != after.accountant:
        raise InvalidConfigError(
            f"job {job!r} is accounted with {before.accountant!r}, got a "
            f"{after.accountant!r} state; keep one accountant per job"
        )
    nm, sr, _ = new[-1]
    return nm, sr, added


class LocalLedger:
    """Append-only record of every DP-SGD run on this hospital's data.

    Parameters
    ----------
    path
        SQLite file (created with its parent directory).
    hospital
        This hospital's name; a ledger file belongs to exactly one hospital.
    accountant
        Accountant for the budget over all jobs (:meth:`total_state`).
    """

    def __init__(self, path: Path, *, hospital: str, accountant: AccountantName = "prv") -> None:
        if not isinstance(hospital, str) or not hospital:
            raise InvalidConfigError(f"hospital must be a non-empty name (got {hospital!r})")
        self._hospital = hospital
        self._accountant: AccountantName = accountant
        AccountantState(accountant)  # validates the name
        self._path = Path(path)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._engine: Engine = create_engine(
                f"sqlite:///{self._path}", connect_args={"timeout": 30}
            )
            _serialize_transactions(self._engine)
            _metadata.create_all(self._engine)
            with self._engine.connect() as conn:
                owners = conn.execute(select(_rounds.c.hospital).distinct()).scalars().all()
        except (OSError, SQLAlchemyError) as exc:
            raise StoreError(
                f"cannot open the privacy ledger at {self._path} ({exc}); make sure the "
                "hospital's state directory exists and is writable by this daemon's user"
            ) from exc
        others = sorted(set(owners) - {hospital})
        if others:
            self._engine.dispose()
            raise StoreError(
                f"the privacy ledger at {self._path} belongs to {', '.join(others)}, "
                f"not {hospital}; give each hospital its own state directory"
            )

    def __enter__(self) -> LocalLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- reading -------------------------------------------------------------

    def _latest_states(self, conn: Connection) -> dict[str, AccountantState]:
        rows = conn.execute(
            select(_rounds.c.job, _rounds.c.state_json).order_by(_rounds.c.id)
        ).all()
        last_json = {job: state_json for job, state_json in rows}  # the newest row wins
        latest: dict[str, AccountantState] = {}
        for job, state_json in last_json.items():
            try:
                latest[job] = AccountantState.from_json(state_json)
            except MalformedUpdateError as exc:
                raise StoreError(
                    f"the privacy ledger at {self._path} holds a corrupt state for job "
                    f"{job!r} ({exc}); restore the file from backup"
                ) from exc
        return latest

    def _read(self) -> dict[str, AccountantState]:
        try:
            with self._engine.connect() as conn:
                return self._latest_states(conn)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the privacy ledger at {self._path}: {exc}") from exc

    def state(self, job: str) -> AccountantState:
        """The accumulated accountant state of ``job`` (empty if it never trained here)."""
        return self._read().get(job, AccountantState(self._accountant))

    def total_state(self) -> AccountantState:
        """Every job on this hospital's data, composed."""
        return _compose(self._accountant, self._read().values())

    def spent(self, *, delta: float) -> float:
        """Epsilon spent over all jobs at ``delta``."""
        return self.total_state().epsilon(delta)

    def spent_elsewhere(self, job: str, *, delta: float) -> float:
        """Epsilon spent over every job but ``job`` at ``delta``.

        What a site policy's total limit adds a new job's budget to.
        """
        others = [state for name, state in self._read().items() if name != job]
        return _compose(self._accountant, others).epsilon(delta) if others else 0.0

    def entries(self, job: str | None = None) -> list[LedgerEntry]:
        """Recorded runs, oldest first, optionally for one job."""
        query = select(_rounds).order_by(_rounds.c.id)
        if job is not None:
            query = query.where(_rounds.c.job == job)
        try:
            with self._engine.connect() as conn:
                return [_entry(row) for row in conn.execute(query).all()]
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the privacy ledger at {self._path}: {exc}") from exc

    # --- the budget ----------------------------------------------------------

    def check_round(
        self,
        *,
        job: str,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        budget: float,
        delta: float,
    ) -> float:
        """Projected epsilon over all jobs if this round's ``steps`` were taken.

        Raises
        ------
        BudgetExhaustedError
            When the projection exceeds ``budget``; nothing is written.
        """
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise InvalidConfigError(f"budget must be an epsilon > 0 (got {budget!r})")
        spent_state = self.total_state()
        spent = spent_state.epsilon(delta)
        projected = spent_state.extended(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        ).epsilon(delta)
        if projected > budget + _TOLERANCE:
            raise BudgetExhaustedError(
                f"{self._hospital}: round {server_round} of job {job!r} would raise epsilon "
                f"to {projected:.2f} > budget {budget:.2f} at delta={delta:g} (spent so far "
                f"{spent:.2f}). The data steward can raise the budget; the round was not trained."
            )
        return projected

    def record_round(
        self, *, job: str, server_round: int, state: AccountantState, delta: float
    ) -> LedgerEntry:
        """Append the job's accountant state after training, in one transaction.

        ``state`` must extend the job's recorded state (restore it with
        :meth:`state` before training); the entry's epsilon is the job's.
        """
        if not isinstance(job, str) or not job:
            raise InvalidConfigError(f"job must be a non-empty name (got {job!r})")
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise InvalidConfigError(f"server_round must be an integer >= 0 (got {server_round!r})")
        epsilon = state.epsilon(delta)  # validates delta, outside the write lock
        try:
            with self._engine.begin() as conn:
                before = self._latest_states(conn).get(job, AccountantState(state.accountant))
                nm, sr, added = _new_steps(job, before, state)
                attempt = conn.execute(
                    select(func.coalesce(func.max(_rounds.c.attempt), 0)).where(
                        _rounds.c.job == job, _rounds.c.server_round == server_round
                    )
                ).scalar_one()
                values = {
                    "hospital": self._hospital,
                    "job": job,
                    "server_round": server_round,
                    "attempt": attempt + 1,
                    "epsilon": epsilon,
                    "delta": float(delta),
                    "noise_multiplier": nm,
                    "sample_rate": sr,
                    "steps": added,
                    "accountant": state.accountant,
                    "state_json": state.to_json(),
                    "recorded_at": datetime.now(UTC),
                }
                conn.execute(_rounds.insert().values(**values))
        except SQLAlchemyError as exc:
            raise StoreError(
                f"could not record round {server_round} of job {job!r} in the privacy ledger "
                f"at {self._path} ({exc}); the update must not leave the hospital"
            ) from exc
        values.pop("hospital")
        values.pop("state_json")
        return LedgerEntry(**values)

    def close(self) -> None:
        """Release the database connections (idempotent)."""
        self._engine.dispose()


def _compose(accountant: AccountantName, states: Any) -> AccountantState:
    total = AccountantState(accountant)
    for state in states:
        total = total.composed_with(state)
    return total


def _serialize_transactions(engine: Engine) -> None:
    """Make every transaction ``BEGIN IMMEDIATE`` (SQLAlchemy's pysqlite recipe).

    Two processes recording for the same job must not both read the same
    "latest state" and append; taking SQLite's write lock at BEGIN orders them.
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
