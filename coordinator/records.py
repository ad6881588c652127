"""Plain records that cross the round store's boundary.

The coordinator hands the store :class:`RoundCommit` and friends and gets back
:class:`Job`, :class:`RoundView`, :class:`LedgerRow` and :class:`AuditRow`. They
are frozen dataclasses, not ORM objects, so nothing outside
:mod:`fedvault.coordinator.store` can touch a session, lazy-load a relation after
the session closed, or mutate a row by accident.

The records that carry what hospitals reported validate themselves on
construction (:class:`~fedvault.errors.MalformedUpdateError`): NaN and
infinities are refused outright, because SQLite silently stores NaN as NULL and
a ledger must not lose a number that way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

from fedvault.errors import MalformedUpdateError

if TYPE_CHECKING:
    from fedvault.messages import RefusalCode

__all__ = [
    "AuditEvent",
    "AuditRow",
    "HospitalEval",
    "Job",
    "LedgerRow",
    "ModelBlob",
    "Participation",
    "RoundCommit",
    "RoundView",
]

ModelKind = Literal["bfv", "plain"]
ParticipationStatus = Literal["ok", "refused", "rejected", "failed"]


def _check(ok: bool, what: str, value: object, domain: str) -> None:
    if not ok:
        raise MalformedUpdateError(
            f"{what} = {value!r} is invalid: it must be {domain}; "
            "drop or reject the report that carried it instead of storing it"
        )


def _check_float(
    what: str, value: float | None, *, low: float = -math.inf, high: float = math.inf
) -> None:
    if value is not None:
        domain = (
            "a finite number" if (low, high) == (-math.inf, math.inf) else f"in [{low}, {high}]"
        )
        _check(math.isfinite(value) and low <= value <= high, what, value, domain)


@dataclass(frozen=True)
class ModelBlob:
    """The global model after a round: HE ciphertext or plaintext bytes.

    ``total_weight`` is the sum of the hospitals' sample weights folded into the
    (still unnormalised) encrypted sum; hospitals divide by it after decrypting,
    because the coordinator cannot divide a ciphertext it cannot read.
    """

    round: int
    kind: ModelKind
    blob: bytes
    total_weight: float

    def __post_init__(self) -> None:
        # Round 0 is the initial model, stored once so a restart re-sends the same bytes.
        _check(self.round >= 0, "ModelBlob.round", self.round, ">= 0")
        _check(self.kind in get_args(ModelKind), "ModelBlob.kind", self.kind, "'bfv' or 'plain'")
        _check_float("ModelBlob.total_weight", self.total_weight, low=0.0)


@dataclass(frozen=True, kw_only=True)
class Participation:
    """One hospital's part in one round, as the coordinator saw it.

    ``steps`` is the hospital's *cumulative* DP-SGD step count in this job, so
    ``(noise_multiplier, sample_rate, steps)`` alone re-derive its ε.
    ``accountant_state`` is the accountant's state as JSON text (kept only in
    the privacy ledger). ``reason`` explains a refusal, rejection or failure.
    ``code`` is a refusal's code, what the coordinator decides on (whether to
    retry the round); the store keeps only ``reason``.
    """

    hospital: str
    node_id: int = 0
    status: ParticipationStatus
    reason: str = ""
    samples: int = 0
    train_loss: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    accountant: str | None = None
    accountant_state: str | None = None
    bytes_received: int = 0
    code: RefusalCode | None = None

    def __post_init__(self) -> None:
        name = f"participation of {self.hospital!r}"
        refused = self.code is None or self.status == "refused"
        _check(refused, f"{name}: code", self.code, "None unless the status is 'refused'")
        _check(bool(self.hospital), "hospital", self.hospital, "a non-empty name")
        statuses = get_args(ParticipationStatus)
        _check(self.status in statuses, f"{name}: status", self.status, f"one of {statuses}")
        _check(0 <= self.node_id < 2**64, f"{name}: node_id", self.node_id, "an unsigned 64-bit id")
        for what in ("train_loss", "noise_multiplier", "epsilon"):
            low = -math.inf if what == "train_loss" else 0.0
            _check_float(f"{name}: {what}", getattr(self, what), low=low)
        _check_float(f"{name}: sample_rate", self.sample_rate, low=0.0, high=1.0)
        if self.delta is not None:
            _check(0.0 <= self.delta < 1.0, f"{name}: delta", self.delta, "in [0, 1)")
        for what in ("samples", "bytes_received", "steps"):
            value = getattr(self, what)
            if value is not None:
                _check(value >= 0, f"{name}: {what}", value, ">= 0")


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """Something worth a line in the hash-chained audit trail."""

    kind: str
    actor: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RoundCommit:
    """Everything one round produced, committed whole or not at all."""

    number: int
    model: ModelBlob
    participations: tuple[Participation, ...]
    train_loss: float | None
    audit: tuple[AuditEvent, ...] = ()
    # Hospitals evaluate the model they received (round ``number - 1``) in the
    # same message; committing it here means a crash cannot lose it.
    previous_evaluations: tuple[HospitalEval, ...] = ()
    # The consortium-wide metrics of that model, pooled from the hospitals'
    # statistics (fedvault.metrics.pool); the store keeps them as given.
    previous_pooled: Mapping[str, float] = field(default_factory=dict)
    # When the committed attempt sent its first instruction (UTC); None: at the
    # commit, a zero-length round (callers that did not time it).
    started_at: datetime | None = None

    def __post_init__(self) -> None:
        _check(self.number >= 1, "RoundCommit.number", self.number, ">= 1")
        _check(
            self.model.round == self.number,
            "RoundCommit.model.round",
            self.model.round,
            f"the committed round number {self.number}",
        )
        _check_float("RoundCommit.train_loss", self.train_loss)


@dataclass(frozen=True, kw_only=True)
class HospitalEval:
    """A hospital's evaluation of a round's global model on its held-out data.

    ``accuracy`` is ``None`` for a regression task; ``metrics`` are the
    hospital's own values of its task's metrics (see :mod:`fedvault.metrics`).
    """

    hospital: str
    accuracy: float | None
    loss: float
    samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = f"evaluation of {self.hospital!r}"
        _check(bool(self.hospital), "hospital", self.hospital, "a non-empty name")
        _check_float(f"{name}: accuracy", self.accuracy, low=0.0, high=1.0)
        _check_float(f"{name}: loss", self.loss)
        _check(self.samples >= 1, f"{name}: samples", self.samples, ">= 1")
        for key, value in self.metrics.items():
            _check_float(f"{name}: {key}", value)


@dataclass(frozen=True)
class Job:
    """A training job, identified by name so a restarted coordinator finds it."""

    id: int
    name: str
    config: Mapping[str, Any]
    status: str
    # When it was stored and last changed (status, rounds); not part of its identity.
    created_at: datetime | None = field(default=None, compare=False)
    updated_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RoundView:
    """A round as stored: a committed round or one failed attempt.

    ``participations`` are the hospitals asked to train; ``evaluations`` every
    hospital that evaluated the round's model (possibly others).
    ``eval_accuracy``/``eval_loss`` are sample-weighted over ``evaluations``;
    ``eval_metrics`` are the task's metrics pooled across them.
    """

    number: int
    status: str
    reason: str
    attempt: int
    total_weight: float | None
    num_participants: int
    train_loss: float | None
    eval_accuracy: float | None
    eval_loss: float | None
    committed_at: datetime | None
    participations: tuple[Participation, ...]
    evaluations: tuple[HospitalEval, ...]
    eval_metrics: Mapping[str, float] = field(default_factory=dict)
    started_at: datetime | None = None  # when the attempt started (UTC)


@dataclass(frozen=True)
class LedgerRow:
    """A hospital's cumulative privacy spend after a committed round."""

    hospital: str
    round: int
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    accountant: str | None


@dataclass(frozen=True)
class AuditRow:
    """A stored audit event with its place in the hash chain.

    ``job`` is the job's name (``None`` for store-wide events).
    """

    id: int
    job: str | None
    created_at: datetime
    kind: str
    actor: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str
