"""A small client of the coordinator's operator API (``proto/admin.proto``).

It authenticates with an operator kit's certificate (mutual TLS; the server
reads the role from it) and returns frozen dataclasses rather than protobuf
messages, so callers never test ``HasField`` or confuse "unset" with 0. gRPC
failures become :class:`OperatorApiError` subclasses whose messages say what to
do: a refusal names the role it needs, an unreachable server names the address.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from fedvault.errors import FedvaultError
from fedvault.kit import Kit, KitError, KitKind
from fedvault.privacy.pki import Role
from fedvault.proto import admin_pb2, admin_pb2_grpc

__all__ = [
    "REQUIRED_ROLE_METADATA",
    "Access",
    "AuditEntry",
    "AuditLog",
    "HospitalEpsilon",
    "JobEntry",
    "JobList",
    "JobStatus",
    "LedgerEntry",
    "MethodAccess",
    "OperatorApiError",
    "OperatorClient",
    "OperatorPermissionError",
    "OperatorUnavailableError",
    "Participant",
    "PrivacyLedger",
    "RoundParticipants",
    "RoundSummary",
]

#: Trailing metadata of a refusal: the least role that may make the call.
REQUIRED_ROLE_METADATA = "fedvault-required-role"
_T = TypeVar("_T")
_R = TypeVar("_R", bound=Message)


class OperatorApiError(FedvaultError):
    """The operator API refused or failed a call; the message says why."""


class OperatorPermissionError(OperatorApiError):
    """The caller's role may not make this call (``required_role`` may)."""

    def __init__(self, message: str, *, required_role: Role | None = None) -> None:
        super().__init__(message)
        self.required_role = required_role


class OperatorUnavailableError(OperatorApiError):
    """The operator API cannot be reached, or the TLS handshake failed."""


@dataclass(frozen=True)
class MethodAccess:
    """One RPC, the least role that may call it, and whether the caller may."""

    method: str
    description: str
    required_role: Role
    allowed: bool


@dataclass(frozen=True)
class Access:
    """Who the server thinks the caller is, and what its role may call."""

    common_name: str
    role: Role
    methods: tuple[MethodAccess, ...]

    def allows(self, method: str) -> bool:
        """Whether the caller's role may call ``method``."""
        return any(m.allowed for m in self.methods if m.method == method)

    def required(self, method: str) -> Role | None:
        """The least role that may call ``method`` (``None``: unknown method)."""
        return next((m.required_role for m in self.methods if m.method == method), None)


@dataclass(frozen=True)
class JobStatus:
    """A job's status and final metrics; ``None`` where nothing is known yet."""

    job: str
    status: str
    paused: bool
    rounds_committed: int
    rounds_planned: int | None
    final_accuracy: float | None
    final_loss: float | None
    epsilon_max: float | None
    delta: float | None
    epsilon_budget: float | None
    final_metrics: Mapping[str, float] = field(default_factory=dict)  # pooled over hospitals
    task: str = ""


@dataclass(frozen=True)
class RoundSummary:
    """One committed round or failed attempt (accuracy/loss: sample-weighted evaluation)."""

    round: int
    attempt: int
    status: str
    reason: str
    accuracy: float | None
    loss: float | None
    train_loss: float | None
    participants: int
    failures: int
    committed_at: str
    metrics: Mapping[str, float] = field(default_factory=dict)  # pooled over hospitals


@dataclass(frozen=True)
class Participant:
    """One hospital in one round; ``epsilon`` is cumulative over the job."""

    hospital: str
    status: str
    reason: str
    samples: int
    train_loss: float | None
    epsilon: float | None
    bytes_received: int
    eval_accuracy: float | None
    eval_loss: float | None


@dataclass(frozen=True)
class RoundParticipants:
    """The hospitals of one round's committed (or last failed) attempt."""

    job: str
    round: int
    attempt: int
    round_status: str
    participants: tuple[Participant, ...]


@dataclass(frozen=True)
class LedgerEntry:
    """A hospital's cumulative privacy spend after one round."""

    hospital: str
    round: int
    epsilon: float
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    accountant: str


@dataclass(frozen=True)
class PrivacyLedger:
    """A job's privacy ledger, by round then hospital."""

    job: str
    epsilon_budget: float | None
    entries: tuple[LedgerEntry, ...]


@dataclass(frozen=True)
class AuditEntry:
    """One hash-chained audit event (``job`` is ``None`` for store-wide ones)."""

    id: int
    time: str
    kind: str
    actor: str
    job: str | None
    detail_json: str
    hash: str
    prev_hash: str


@dataclass(frozen=True)
class AuditLog:
    """The newest audit events, and whether the whole hash chain verified."""

    events: tuple[AuditEntry, ...]
    total: int
    chain_intact: bool
    first_broken_id: int | None


@dataclass(frozen=True)
class JobEntry:
    """One job of the coordinator's store; ``queue_position`` 0: not in the queue."""

    job: str
    status: str
    rounds_committed: int
    rounds_planned: int | None
    created_at: str
    updated_at: str
    queue_position: int
    task: str

    def to_json(self) -> dict[str, object]:
        """Plain JSON (``fedvault job list --json``)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class HospitalEpsilon:
    """A hospital's ε in each job (cumulative there) and summed over jobs (composition)."""

    hospital: str
    per_job: Mapping[str, float]
    total: float
    delta_total: float | None

    def to_json(self) -> dict[str, object]:
        """Plain JSON (``fedvault job list --json``)."""
        return {
            "hospital": self.hospital,
            "per_job": dict(self.per_job),
            "total": self.total,
            "delta_total": self.delta_total,
        }


@dataclass(frozen=True)
class JobList:
    """Every job, oldest first; ``epsilon`` is empty unless ``epsilon_visible``."""

    jobs: tuple[JobEntry, ...]
    epsilon: tuple[HospitalEpsilon, ...]
    epsilon_visible: bool


def _fields(cls: type[_T], message: Message, **overrides: object) -> _T:
    """Build dataclass ``cls`` from the same-named fields of ``message`` (unset -> None)."""
    values: dict[str, Any] = {}
    for name in cls.__dataclass_fields__:  # type: ignore[attr-defined]
        if name in overrides:
            values[name] = overrides[name]
        elif message.DESCRIPTOR.fields_by_name[name].has_presence:
            values[name] = getattr(message, name) if message.HasField(name) else None
        else:
            values[name] = getattr(message, name)
    return cls(**values)


def _job_status(m: admin_pb2.JobStatus) -> JobStatus:
    return _fields(
        JobStatus,
        m,
        rounds_planned=m.rounds_planned or None,
        final_metrics=dict(sorted(m.final_metrics.items())),
    )


class OperatorClient:
    """Calls the operator API with an operator kit's certificate.

    Parameters
    ----------
    kit
        An operator kit (``OUT/operators/NAME`` from ``fedvault provision``).
    address
        ``host:port`` of the API; defaults to the kit's ``operator_api``.
    timeout
        Seconds per call.
    """

    def __init__(self, kit: Kit, *, address: str | None = None, timeout: float = 10.0) -> None:
        if kit.kind is not KitKind.OPERATOR:
            raise KitError(
                f"kit {kit.root} is the {kit.kind.value} kit of {kit.party!r}; the operator API "
                "takes an operator kit (OUT/operators/NAME from `fedvault provision`)"
            )

        def read(path: Path) -> bytes:
            return kit.read(path.relative_to(kit.root).as_posix())

        self._open(
            address or kit.operator_api_address,
            ca_pem=read(kit.ca_path),
            cert_pem=read(kit.cert_path),
            key_pem=read(kit.key_path),
            timeout=timeout,
        )

    @classmethod
    def from_pem(
        cls,
        address: str,
        *,
        ca_pem: bytes,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        timeout: float = 10.0,
    ) -> OperatorClient:
        """Connect with raw PEM material (tooling and tests; prefer the kit constructor)."""
        client = cls.__new__(cls)
        client._open(address, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, timeout=timeout)
        return client

    def _open(
        self,
        address: str,
        *,
        ca_pem: bytes,
        cert_pem: bytes | None,
        key_pem: bytes | None,
        timeout: float,
    ) -> None:
        if not timeout > 0:
            raise OperatorApiError(f"timeout must be > 0 seconds (got {timeout!r})")
        self.address = address
        self._timeout = timeout
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        self._channel = grpc.secure_channel(address, credentials)
        self._stub = admin_pb2_grpc.OperatorServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel to the operator API."""
        self._channel.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self, method: str, request: Message, reply: type[_R], *, timeout: float | None = None
    ) -> _R:
        """Call ``method``; its answer is a ``reply`` message (the stub is untyped)."""
        rpc: Callable[..., object] = getattr(self._stub, method)
        try:
            answer = rpc(request, timeout=timeout or self._timeout)
        except grpc.RpcError as exc:
            raise self._error(method, exc) from None
        if not isinstance(answer, reply):
            raise OperatorApiError(
                f"{method} answered with {type(answer).__name__}, not {reply.__name__}"
            )
        return answer

    def _error(self, method: str, exc: grpc.RpcError) -> OperatorApiError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
        if code is grpc.StatusCode.PERMISSION_DENIED:
            trailing = dict(exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else {}
            wanted = trailing.get(REQUIRED_ROLE_METADATA)
            required = Role(wanted) if wanted in {r.value for r in Role} else None
            return OperatorPermissionError(
                details or f"{method} was refused; ask an admin", required_role=required
            )
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return OperatorUnavailableError(
                f"coordinator operator API at {self.address} unreachable: is `fedvault "
                "coordinator start` running? If it is, check that your kit belongs to the same "
                f"consortium (another CA's certificate fails the TLS handshake). ({details})"
            )
        return OperatorApiError(details or f"{method} failed with {code.name}")

    # -- the RPCs ----------------------------------------------------------------

    def access(self) -> Access:
        """Who the server sees, and which methods the caller's role may call."""
        m = self._call("GetAccess", admin_pb2.GetAccessRequest(), admin_pb2.GetAccessResponse)
        methods = tuple(
            MethodAccess(a.method, a.description, Role(a.required_role), a.allowed)
            for a in m.methods
        )
        return Access(m.common_name, Role(m.role), methods)

    def job_status(self, job: str = "") -> JobStatus:
        """A job's status and final metrics (every role); ``""``: the latest job."""
        request = admin_pb2.GetJobStatusRequest(job=job)
        return _job_status(self._call("GetJobStatus", request, admin_pb2.JobStatus))

    def rounds(self, job: str = "") -> tuple[RoundSummary, ...]:
        """Every committed round and failed attempt (engineer and above)."""
        m = self._call(
            "ListRounds", admin_pb2.ListRoundsRequest(job=job), admin_pb2.ListRoundsResponse
        )
        return tuple(
            _fields(RoundSummary, r, metrics=dict(sorted(r.metrics.items()))) for r in m.rounds
        )

    def participants(self, round_number: int, job: str = "") -> RoundParticipants:
        """The hospitals of one round (engineer and above)."""
        request = admin_pb2.ListParticipantsRequest(job=job, round=round_number)
        m = self._call("ListParticipants", request, admin_pb2.ListParticipantsResponse)
        people = tuple(_fields(Participant, p) for p in m.participants)
        return _fields(RoundParticipants, m, participants=people)

    def privacy_ledger(self, job: str = "") -> PrivacyLedger:
        """Each hospital's cumulative (ε, δ) per round (auditor and above)."""
        request = admin_pb2.GetPrivacyLedgerRequest(job=job)
        m = self._call("GetPrivacyLedger", request, admin_pb2.GetPrivacyLedgerResponse)
        entries = tuple(_fields(LedgerEntry, e) for e in m.entries)
        return _fields(PrivacyLedger, m, entries=entries)

    def audit_log(self, job: str = "", *, limit: int = 100) -> AuditLog:
        """The newest ``limit`` audit events, all jobs when ``job`` is empty (auditor+)."""
        request = admin_pb2.GetAuditLogRequest(job=job, limit=limit)
        m = self._call("GetAuditLog", request, admin_pb2.GetAuditLogResponse)
        events = tuple(_fields(AuditEntry, e, job=e.job or None) for e in m.events)
        return _fields(AuditLog, m, events=events)

    def stop_job(self, job: str = "", *, reason: str = "") -> JobStatus:
        """Stop a queued job, or a running one now (engineer and above)."""
        return self._control("StopJob", job, reason)

    def pause_job(self, job: str = "", *, reason: str = "") -> JobStatus:
        """Hold the job before its next round (engineer and above)."""
        return self._control("PauseJob", job, reason)

    def resume_job(self, job: str = "", *, reason: str = "") -> JobStatus:
        """Lift a pause, or queue a stopped or failed job again (engineer and above)."""
        return self._control("ResumeJob", job, reason)

    def submit_job(self, job_toml: str, *, reason: str = "", timeout: float = 60.0) -> JobEntry:
        """Queue a job from its job file's text (engineer and above).

        ``timeout``: the coordinator reads the job's task in a child process first,
        which takes seconds.
        """
        request = admin_pb2.SubmitJobRequest(job_toml=job_toml, reason=reason)
        m = self._call("SubmitJob", request, admin_pb2.JobEntry, timeout=timeout)
        return _fields(JobEntry, m, rounds_planned=m.rounds_planned or None)

    def list_jobs(self) -> JobList:
        """Every job, and each hospital's ε per job and in total where the role allows."""
        m = self._call("ListJobs", admin_pb2.ListJobsRequest(), admin_pb2.ListJobsResponse)
        jobs = tuple(_fields(JobEntry, j, rounds_planned=j.rounds_planned or None) for j in m.jobs)
        spend = tuple(
            _fields(HospitalEpsilon, e, per_job=dict(sorted(e.per_job.items()))) for e in m.epsilon
        )
        return JobList(jobs, spend, m.epsilon_visible)

    def _control(self, method: str, job: str, reason: str) -> JobStatus:
        request = admin_pb2.JobControlRequest(job=job, reason=reason)
        return _job_status(self._call(method, request, admin_pb2.JobStatus))
