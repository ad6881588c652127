"""Fixtures of the round-store contract suite: one suite, three backends.

Like Flower's ``linkstate_test.py``, every contract test runs against SQLite in
memory, a SQLite file and PostgreSQL, each once without and once with an
at-rest key (``+at-rest``). Each PostgreSQL test gets a fresh schema
(selected through ``search_path``) that is dropped afterwards, so tests never
see each other's rows. When PostgreSQL is unreachable its tests are skipped,
except under CI (``CI=true``), where they fail: CI must prove all backends.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from fedvault.coordinator.records import AuditEvent, ModelBlob, Participation, RoundCommit
from fedvault.coordinator.store import RoundStore, sqlite_url

POSTGRES_URL = os.environ.get(
    "FEDVAULT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite-memory", "sqlite-file", "postgresql")
DURABLE_BACKENDS = ("sqlite-file", "postgresql")
# A fixed test key (a real one is 32 random bytes from the coordinator kit).
AT_REST_KEY = bytes.fromhex("6a" * 16 + "3c" * 16)
AT_REST_PARAMS = ("", "+at-rest")


@dataclass(frozen=True)
class StoreTarget:
    """Where a test's store lives; open it again with :meth:`open`."""

    backend: str
    url: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    at_rest_key: bytes | None = None

    def open(self, *, at_rest_key: bytes | str | None = "default") -> RoundStore:
        """Open the store (with this target's key, unless another key or None is given)."""
        key = self.at_rest_key if isinstance(at_rest_key, str) else at_rest_key
        return RoundStore(self.url, at_rest_key=key, engine_kwargs=self.engine_kwargs)

    def raw_engine(self) -> Engine:
        """A plain engine on the same database (no store: no pragmas, no migrations)."""
        return create_engine(self.url, poolclass=NullPool, **self.engine_kwargs)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """An admin engine on the test database, or a skip (a failure under CI)."""
    engine = create_engine(POSTGRES_URL, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        message = (
            f"PostgreSQL at {POSTGRES_URL} is unreachable ({exc.orig}); start it "
            "(e.g. `pg_ctlcluster 15 main start`) or set FEDVAULT_TEST_POSTGRES_URL"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    yield engine.execution_options(isolation_level="AUTOCOMMIT")
    engine.dispose()


def _target(param: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreTarget]:
    backend, _, at_rest = param.partition("+")
    key = AT_REST_KEY if at_rest else None
    if backend == "sqlite-memory":
        yield StoreTarget(backend, "sqlite://", at_rest_key=key)
    elif backend == "sqlite-file":
        yield StoreTarget(backend, sqlite_url(tmp_path / "fedvault.sqlite"), at_rest_key=key)
    else:
        admin: Engine = request.getfixturevalue("postgres_admin")
        schema = f"fedvault_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            options = {"connect_args": {"options": f"-csearch_path={schema}"}}
            yield StoreTarget(backend, POSTGRES_URL, options, at_rest_key=key)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=[b + a for b in BACKENDS for a in AT_REST_PARAMS])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreTarget]:
    """Every backend, without and with an at-rest key."""
    yield from _target(request.param, request, tmp_path)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreTarget]:
    """Every backend, no key (tests that choose their keys themselves)."""
    yield from _target(request.param, request, tmp_path)


@pytest.fixture(params=DURABLE_BACKENDS)
def durable_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreTarget]:
    """SQLite file and PostgreSQL, no key (migration tests build the database themselves)."""
    yield from _target(request.param, request, tmp_path)


@pytest.fixture(params=[b + a for b in DURABLE_BACKENDS for a in AT_REST_PARAMS])
def durable_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreTarget]:
    """Backends that outlive the store object (a reopened in-memory store is empty)."""
    yield from _target(request.param, request, tmp_path)


@pytest.fixture
def store(target: StoreTarget) -> Iterator[RoundStore]:
    with target.open() as opened:
        yield opened


class Rounds:
    """Plausible round data: ε and DP-SGD steps grow with the round, per hospital.

    Hospital ``hospital-i`` has ``100 * i`` samples, sample rate ``0.01 * i``,
    takes 10 steps per round and has spent ``0.3 * round + 0.01 * i`` (ε).
    """

    @staticmethod
    def epsilon(hospital: str, number: int) -> float:
        return 0.3 * number + 0.01 * int(hospital.rsplit("-", 1)[1])

    def participation(self, hospital: str, number: int, **overrides: Any) -> Participation:
        index = int(hospital.rsplit("-", 1)[1])
        values: dict[str, Any] = {
            "hospital": hospital,
            "node_id": 2**63 + index,  # above the signed 64-bit range on purpose
            "status": "ok",
            "samples": 100 * index,
            "train_loss": 1.0 / number + 0.001 * index,
            "epsilon": self.epsilon(hospital, number),
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "sample_rate": 0.01 * index,
            "steps": 10 * number,
            "accountant": "prv",
            "accountant_state": json.dumps({"history": [[1.1, 0.01 * index, 10 * number]]}),
            "bytes_received": 1000 * index,
        }
        values.update(overrides)
        return Participation(**values)

    def commit(
        self,
        number: int,
        hospitals: Sequence[str] = ("hospital-1", "hospital-2"),
        *,
        refused: Sequence[str] = (),
        rejected: Sequence[str] = (),
        audit: Sequence[AuditEvent] = (),
        extra: Sequence[Participation] = (),
        kind: str = "bfv",
    ) -> RoundCommit:
        ok = [self.participation(h, number) for h in hospitals]
        others = [
            *(
                Participation(hospital=h, status="refused", reason="budget exhausted")
                for h in refused
            ),
            *(
                Participation(hospital=h, status="rejected", reason="context fingerprint mismatch")
                for h in rejected
            ),
        ]
        weight = float(sum(p.samples for p in ok))
        return RoundCommit(
            number=number,
            model=ModelBlob(number, kind, self.blob(number), weight),  # type: ignore[arg-type]
            participations=(*ok, *others, *extra),
            train_loss=sum(p.samples * (p.train_loss or 0.0) for p in ok) / weight,
            audit=tuple(audit),
        )

    @staticmethod
    def blob(number: int) -> bytes:
        return bytes(range(256)) * 4 + f"round-{number}".encode()


@pytest.fixture
def data() -> Rounds:
    return Rounds()
