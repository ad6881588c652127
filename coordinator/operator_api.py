"""The coordinator's operator API: status, rounds, ledger, audit trail, job control.

A gRPC service (``fedvault.admin.v1.OperatorService``, ``proto/admin.proto``)
over mutual TLS with the consortium CA. The caller's role is read from the
subject ``OU=role:<role>`` of its *verified* client certificate
(:func:`~fedvault.privacy.pki.role_from_certificate`), never from a request
field, so holding a certificate is the only way to hold a role. A certificate
that carries no role (a hospital's, the coordinator's) is refused.

Access matrix (✓ allowed). It is enforced in one place, :class:`AccessControl`,
keyed by method name through :data:`ACCESS`; a method missing from the table is
refused (fail closed):

=================  =====  =======  ========  =====
method             guest  auditor  engineer  admin
=================  =====  =======  ========  =====
GetAccess          ✓      ✓        ✓         ✓
GetJobStatus       ✓      ✓        ✓         ✓
ListRounds                         ✓         ✓
ListParticipants                   ✓         ✓
GetPrivacyLedger          ✓        ✓         ✓
GetAuditLog               ✓        ✓         ✓
ListJobs           ✓      ✓        ✓         ✓
StopJob                            ✓         ✓
PauseJob                           ✓         ✓
ResumeJob                          ✓         ✓
SubmitJob                          ✓         ✓
=================  =====  =======  ========  =====

A guest sees only a job's final metrics, and the list of jobs without the
privacy ledger's ε (:meth:`OperatorServicer.ListJobs` adds it for an auditor and
above). Auditors (privacy officers) read the ledger and the audit trail but not
the per-round operations, and run no job. Engineers may read the ledger too: the
levels stay ordered as :meth:`Role.allows` defines them, the participants of a
round (engineer) already carry each hospital's ε, and an engineer needs the
spend to diagnose budget refusals. Engineers and admins run the coordinator
service's job queue: submit, stop, pause and resume jobs.

Every denial is appended to the audit trail (``operator_denied``, actor = the
certificate's common name), and so is every job-control action
(``operator_action``), *before* the action takes effect: no action without its
record. A stop sets the job's stored status to ``stopped`` (the coordinator
service then stops a running job's Flower run; a queued job never starts). A
resume of a stopped or failed job queues it again. The store has no ``paused``
status, so a pause is the ``operator_action`` event itself; the round loop calls
:meth:`RoundStore.requested_control` between rounds (see there).

``SubmitJob`` needs the coordinator service (:class:`JobIntake`, passed to
:func:`serve` by :mod:`.daemon`), which validates the job file against the
consortium and the installed task; without one it answers FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn, TypeVar

import grpc
from cryptography import x509
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from fedvault.errors import FedvaultError, InvalidConfigError, StoreError
from fedvault.kit import Kit, KitKind
from fedvault.privacy.pki import Role, common_name, role_from_certificate, verify_issued_by
from fedvault.proto import admin_pb2, admin_pb2_grpc

from .records import AuditEvent, AuditRow, Job, LedgerRow, RoundView
from .store import RoundStore
from .store_models import JobTable, canonical_json

__all__ = [
    "ACCESS",
    "REQUIRED_ROLE_METADATA",
    "SERVICE",
    "AccessControl",
    "Caller",
    "JobIntake",
    "OperatorServicer",
    "Rule",
    "require_coordinator_kit",
    "serve",
]

_log = logging.getLogger(__name__)

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name
#: Trailing metadata of a PERMISSION_DENIED answer: the least role that may call.
REQUIRED_ROLE_METADATA = "fedvault-required-role"
_M = TypeVar("_M", bound=Message)
_REASON_MAX = 500  # characters of an operator's free-text reason kept in the audit trail


@dataclass(frozen=True)
class Rule:
    """Who may call one method, and what it does (for refusal messages)."""

    required: Role
    description: str


ACCESS: Mapping[str, Rule] = MappingProxyType(
    {
        "GetAccess": Rule(Role.GUEST, "list what your role may do"),
        "GetJobStatus": Rule(Role.GUEST, "read a job's status"),
        "ListRounds": Rule(Role.ENGINEER, "list the rounds"),
        "ListParticipants": Rule(Role.ENGINEER, "list a round's participants"),
        "GetPrivacyLedger": Rule(Role.AUDITOR, "read the privacy ledger"),
        "GetAuditLog": Rule(Role.AUDITOR, "read the audit log"),
        "ListJobs": Rule(Role.GUEST, "list the jobs"),
        "StopJob": Rule(Role.ENGINEER, "stop a job"),
        "PauseJob": Rule(Role.ENGINEER, "pause a job"),
        "ResumeJob": Rule(Role.ENGINEER, "resume a job"),
        "SubmitJob": Rule(Role.ENGINEER, "submit a job"),
    }
)


@dataclass(frozen=True)
class JobIntake:
    """The coordinator service's side of ``SubmitJob`` and of resuming a stopped job.

    ``validate`` reads a job file's text into the job's name and stored
    configuration, checked against the consortium and the installed task; it
    raises :class:`~fedvault.errors.FedvaultError` with what to fix. ``wake``
    tells the service's queue that a job was queued.
    """

    validate: Callable[[str], tuple[str, Mapping[str, object]]]
    wake: Callable[[], None]


@dataclass(frozen=True)
class Caller:
    """An authenticated operator: certificate common name and role."""

    common_name: str
    role: Role


_CALLER: ContextVar[Caller] = ContextVar("fedvault_operator_caller")


class _RefusedError(Exception):
    """A servicer's answer other than OK; :class:`AccessControl` turns it into a status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _ask(required: Role) -> str:
    names = [r.value for r in sorted(Role, key=lambda r: r.level) if r.allows(required)]
    named = [f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in names]
    return named[0] if len(named) == 1 else f"{', '.join(named[:-1])} or {named[-1]}"


class AccessControl(grpc.ServerInterceptor):  # type: ignore[misc]
    """The one place that authenticates callers and enforces :data:`ACCESS`.

    Wraps every unary handler of the service: reads the peer certificate that
    TLS verified, checks it once more against the consortium CA, reads its role,
    refuses (and audits) what the matrix does not allow, then runs the servicer
    with the :class:`Caller` in a context variable. Non-unary or unknown methods
    get no handler (UNIMPLEMENTED).
    """

    def __init__(self, store: RoundStore, ca_cert: x509.Certificate) -> None:
        self._store = store
        self._ca = ca_cert

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap a unary method's handler in the access check; other methods get none."""
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return None
        full: str = handler_call_details.method
        method = full.rsplit("/", 1)[-1] if full.startswith(f"/{SERVICE}/") else full
        behavior = handler.unary_unary

        def guarded(request: Message, context: grpc.ServicerContext) -> Message:
            caller = self._authorize(method, context)
            token = _CALLER.set(caller)
            try:
                return behavior(request, context)
            except _RefusedError as exc:
                context.abort(exc.code, str(exc))
            except StoreError as exc:
                _log.error("operator API %s: %s", method, exc)
                context.abort(grpc.StatusCode.INTERNAL, str(exc))
            except FedvaultError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            finally:
                _CALLER.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _authorize(self, method: str, context: grpc.ServicerContext) -> Caller:
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:  # TLS requires a client certificate; refuse if one ever slips through
            self._deny(context, method, "", None, None, "no client certificate was presented")
        try:
            cert = x509.load_pem_x509_certificate(pems[0])
        except ValueError:
            self._deny(context, method, "", None, None, "the client certificate does not parse")
        cn = common_name(cert)
        try:
            verify_issued_by(cert, self._ca)
            role = role_from_certificate(cert)
        except InvalidConfigError as exc:
            self._deny(context, method, cn, None, None, str(exc))
        rule = ACCESS.get(method)
        if rule is None:
            self._deny(context, method, cn, role, None, f"{method} is not an operator method")
        if not role.allows(rule.required):
            message = (
                f"role {role.value} may not {rule.description} (requires {rule.required.value} "
                f"or above); ask {_ask(rule.required)}"
            )
            self._deny(context, method, cn, role, rule.required, message)
        return Caller(cn, role)

    def _deny(
        self,
        context: grpc.ServicerContext,
        method: str,
        cn: str,
        role: Role | None,
        required: Role | None,
        message: str,
    ) -> NoReturn:
        detail = {"method": method, "role": None if role is None else role.value}
        if role is None:
            detail["reason"] = message
        try:
            self._store.append_audit(
                AuditEvent(kind="operator_denied", actor=cn or "<unknown>", detail=detail)
            )
        except FedvaultError as exc:  # still refuse: a full disk must not open the door
            _log.error("could not audit a denied %s by %r: %s", method, cn, exc)
        if required is not None:
            context.set_trailing_metadata(((REQUIRED_ROLE_METADATA, required.value),))
        context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _current() -> Caller:
    caller = _CALLER.get(None)
    if caller is None:
        raise _RefusedError(grpc.StatusCode.PERMISSION_DENIED, "unauthenticated call")
    return caller


def _iso(when: datetime | None) -> str:
    return "" if when is None else when.astimezone(UTC).isoformat()


def _job_status(
    job: Job, rounds: list[RoundView], rows: list[LedgerRow], paused: bool
) -> admin_pb2.JobStatus:
    committed = [r for r in rounds if r.status == "committed"]
    evaluated = [r for r in committed if r.eval_accuracy is not None or r.eval_metrics]
    planned = job.config.get("rounds")
    msg = admin_pb2.JobStatus(
        job=job.name,
        status=job.status,
        paused=paused,
        rounds_committed=max((r.number for r in committed), default=0),
        rounds_planned=planned if isinstance(planned, int) and planned > 0 else 0,
        epsilon_budget=_budget(job),
        task=str(job.config.get("task") or job.config.get("example") or ""),
    )
    if evaluated:
        if evaluated[-1].eval_accuracy is not None:
            msg.final_accuracy = evaluated[-1].eval_accuracy
        msg.final_loss = evaluated[-1].eval_loss or 0.0
        msg.final_metrics.update(evaluated[-1].eval_metrics)
    if rows:
        msg.epsilon_max = max(r.epsilon for r in rows)
        deltas = [r.delta for r in rows if r.delta is not None]
        if deltas:
            msg.delta = max(deltas)
    return msg


def _job_entry(job: Job, rounds_committed: int, position: int) -> admin_pb2.JobEntry:
    planned = job.config.get("rounds")
    return admin_pb2.JobEntry(
        job=job.name,
        status=job.status,
        rounds_committed=rounds_committed,
        rounds_planned=planned if isinstance(planned, int) and planned > 0 else 0,
        created_at=_iso(job.created_at),
        updated_at=_iso(job.updated_at),
        queue_position=position,
        task=str(job.config.get("task") or job.config.get("example") or ""),
    )


def _epsilon_by_hospital(ledgers: Mapping[str, list[LedgerRow]]) -> list[admin_pb2.HospitalEpsilon]:
    """Each hospital's ε per job (its last ledger row there) and summed over jobs.

    The sum is sequential composition: a valid bound on the spend over all the
    jobs on one hospital's records (its own ledger composes the accountants,
    which can only be tighter; see :mod:`fedvault.client.ledger`).
    """
    last: dict[str, dict[str, LedgerRow]] = {}
    for job, rows in ledgers.items():
        for row in rows:  # by round: a hospital's last row holds its cumulative spend
            last.setdefault(row.hospital, {})[job] = row
    out = []
    for hospital, by_job in sorted(last.items()):
        msg = admin_pb2.HospitalEpsilon(
            hospital=hospital,
            per_job={job: row.epsilon for job, row in by_job.items()},
            total=math.fsum(row.epsilon for row in by_job.values()),
        )
        deltas = [row.delta for row in by_job.values()]
        if all(d is not None for d in deltas):
            msg.delta_total = math.fsum(d for d in deltas if d is not None)
        out.append(msg)
    return out


def _differing(stored: Mapping[str, object], wanted: Mapping[str, object]) -> list[str]:
    return sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))


def _budget(job: Job) -> float | None:
    privacy = job.config.get("privacy")
    epsilon = privacy.get("epsilon") if isinstance(privacy, Mapping) else None
    return float(epsilon) if isinstance(epsilon, int | float) else None


def _copy(cls: type[_M], record: object, **values: object) -> _M:
    """Message ``cls`` from ``values`` and the same-named attributes of ``record``.

    ``None`` leaves a field unset, so an optional field reads as absent, not 0.
    """
    names = cls.DESCRIPTOR.fields_by_name
    same = {n: getattr(record, n) for n in names if n not in values and hasattr(record, n)}
    return cls(**same, **values)


def _round_summary(v: RoundView) -> admin_pb2.RoundSummary:
    return _copy(
        admin_pb2.RoundSummary,
        v,
        round=v.number,
        accuracy=v.eval_accuracy,
        loss=v.eval_loss,
        participants=v.num_participants,
        failures=sum(p.status != "ok" for p in v.participations),
        committed_at=_iso(v.committed_at),
        metrics=dict(v.eval_metrics),
    )


def _participants(job: Job, v: RoundView) -> admin_pb2.ListParticipantsResponse:
    evals = {e.hospital: e for e in v.evaluations}
    out = [
        _copy(
            admin_pb2.Participant,
            p,
            eval_accuracy=evals[p.hospital].accuracy if p.hospital in evals else None,
            eval_loss=evals[p.hospital].loss if p.hospital in evals else None,
        )
        for p in v.participations
    ]
    trained = {p.hospital for p in v.participations}
    out += [
        admin_pb2.Participant(
            hospital=e.hospital, status="evaluated", eval_accuracy=e.accuracy, eval_loss=e.loss
        )
        for e in v.evaluations
        if e.hospital not in trained
    ]
    return admin_pb2.ListParticipantsResponse(
        job=job.name, round=v.number, attempt=v.attempt, round_status=v.status, participants=out
    )


def _audit_entry(e: AuditRow) -> admin_pb2.AuditEntry:
    detail = canonical_json(dict(e.detail))
    return _copy(admin_pb2.AuditEntry, e, time=_iso(e.created_at), detail_json=detail)


class OperatorServicer(admin_pb2_grpc.OperatorServiceServicer):  # type: ignore[misc]
    """The RPCs, reading the round store; access was checked by :class:`AccessControl`."""

    def __init__(self, store: RoundStore, intake: JobIntake | None = None) -> None:
        self._store = store
        self._intake = intake

    def _job(self, name: str) -> Job:
        if not name:
            try:
                with Session(self._store.engine) as s:
                    name = (
                        s.scalar(
                            select(JobTable.name)
                            .order_by(JobTable.updated_at.desc(), JobTable.id.desc())
                            .limit(1)
                        )
                        or ""
                    )
            except SQLAlchemyError as exc:
                raise StoreError(f"could not list the jobs of the round store: {exc}") from exc
            if not name:
                raise _RefusedError(
                    grpc.StatusCode.NOT_FOUND,
                    "the round store holds no job yet; start one with `fedvault coordinator start`",
                )
        job = self._store.get_job(name)
        if job is None:
            raise _RefusedError(
                grpc.StatusCode.NOT_FOUND,
                f"no job {name!r} in the round store; check the name, or leave it empty for the "
                "most recent job",
            )
        return job

    def _status(self, job: Job) -> admin_pb2.JobStatus:
        paused = self._store.requested_control(job.name) == "pause"
        return _job_status(job, self._store.rounds(job.id), self._store.ledger(job.id), paused)

    def GetAccess(  # noqa: N802
        self, request: admin_pb2.GetAccessRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetAccessResponse:
        """Who the caller is and which methods its role may call."""
        caller = _current()
        return admin_pb2.GetAccessResponse(
            common_name=caller.common_name,
            role=caller.role.value,
            methods=[
                admin_pb2.MethodAccess(
                    method=name,
                    description=rule.description,
                    required_role=rule.required.value,
                    allowed=caller.role.allows(rule.required),
                )
                for name, rule in ACCESS.items()
            ],
        )

    def GetJobStatus(  # noqa: N802
        self, request: admin_pb2.GetJobStatusRequest, context: grpc.ServicerContext
    ) -> admin_pb2.JobStatus:
        """A job's status and final metrics (empty ``request.job``: the most recent)."""
        return self._status(self._job(request.job))

    def ListRounds(  # noqa: N802
        self, request: admin_pb2.ListRoundsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListRoundsResponse:
        """Every committed round and failed attempt of the job, in order."""
        job = self._job(request.job)
        rounds = [_round_summary(v) for v in self._store.rounds(job.id)]
        return admin_pb2.ListRoundsResponse(job=job.name, rounds=rounds)

    def ListParticipants(  # noqa: N802
        self, request: admin_pb2.ListParticipantsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListParticipantsResponse:
        """The hospitals asked to train in one round (its committed attempt, else the last)."""
        if request.round < 1:
            raise _RefusedError(grpc.StatusCode.INVALID_ARGUMENT, "round must be >= 1")
        job = self._job(request.job)
        views = [v for v in self._store.rounds(job.id) if v.number == request.round]
        if not views:
            raise _RefusedError(
                grpc.StatusCode.NOT_FOUND,
                f"job {job.name!r} has no round {request.round} yet; list them with ListRounds",
            )
        committed = [v for v in views if v.status == "committed"]
        return _participants(job, committed[0] if committed else views[-1])

    def GetPrivacyLedger(  # noqa: N802
        self, request: admin_pb2.GetPrivacyLedgerRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetPrivacyLedgerResponse:
        """Each hospital's cumulative privacy spend per round, and the job's ε budget."""
        job = self._job(request.job)
        entries = [_copy(admin_pb2.LedgerEntry, r) for r in self._store.ledger(job.id)]
        return admin_pb2.GetPrivacyLedgerResponse(
            job=job.name, epsilon_budget=_budget(job), entries=entries
        )

    def GetAuditLog(  # noqa: N802
        self, request: admin_pb2.GetAuditLogRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetAuditLogResponse:
        """The newest audit events (of one job, or all) and the hash chain's verification."""
        job_id = self._job(request.job).id if request.job else None
        events = self._store.audit_events(job_id)
        broken = self._store.verify_audit_chain()
        return admin_pb2.GetAuditLogResponse(
            events=[_audit_entry(e) for e in events[-(request.limit or 100) :]],
            total=len(events),
            chain_intact=broken is None,
            first_broken_id=broken,
        )

    def StopJob(  # noqa: N802
        self, request: admin_pb2.JobControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.JobStatus:
        """Stop a queued job, or a running one (its Flower run is stopped) (audited)."""
        return self._control(request, "StopJob", "stop")

    def PauseJob(  # noqa: N802
        self, request: admin_pb2.JobControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.JobStatus:
        """Ask the round loop to wait before the next round (audited)."""
        return self._control(request, "PauseJob", "pause")

    def ResumeJob(  # noqa: N802
        self, request: admin_pb2.JobControlRequest, context: grpc.ServicerContext
    ) -> admin_pb2.JobStatus:
        """Lift a pause, or queue a stopped or failed job again (audited)."""
        return self._control(request, "ResumeJob", "resume")

    def SubmitJob(  # noqa: N802
        self, request: admin_pb2.SubmitJobRequest, context: grpc.ServicerContext
    ) -> admin_pb2.JobEntry:
        """Queue a job from its job file's text (audited); it runs after those before it."""
        caller = _current()
        intake = self._need_intake()
        try:
            name, config = intake.validate(request.job_toml)
        except StoreError:
            raise
        except FedvaultError as exc:
            raise _RefusedError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        existing = self._store.get_job(name)
        if existing is not None:
            _check_resubmit(existing, json.loads(canonical_json(dict(config))))
        self._audit(caller, existing, "SubmitJob", "submit", request.reason, job=name)
        job = self._store.submit_job(name, config)
        intake.wake()
        return self._entry(job)

    def ListJobs(  # noqa: N802
        self, request: admin_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListJobsResponse:
        """Every job, oldest first, with its queue position; ε per hospital where allowed."""
        caller = _current()
        jobs = self._store.list_jobs()
        visible = caller.role.allows(ACCESS["GetPrivacyLedger"].required)
        spend = (
            _epsilon_by_hospital({j.name: self._store.ledger(j.id) for j in jobs})
            if visible
            else []
        )
        return admin_pb2.ListJobsResponse(
            jobs=[self._entry(j) for j in jobs], epsilon=spend, epsilon_visible=visible
        )

    def _entry(self, job: Job) -> admin_pb2.JobEntry:
        queue = {j.id: i + 1 for i, j in enumerate(self._store.job_queue())}
        done = self._store.last_committed_round(job.id)
        return _job_entry(job, done, queue.get(job.id, 0))

    def _need_intake(self) -> JobIntake:
        if self._intake is None:
            raise _RefusedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this operator API runs no job queue; submit jobs to the operator API of "
                "`fedvault coordinator start`",
            )
        return self._intake

    def _audit(
        self, caller: Caller, row: Job | None, method: str, action: str, reason: str, **extra: str
    ) -> None:
        detail = {
            "method": method,
            "action": action,
            "role": caller.role.value,
            "reason": str(reason)[:_REASON_MAX],
            **extra,
        }
        # The record first: an action must never take effect without one.
        event = AuditEvent(kind="operator_action", actor=caller.common_name, detail=detail)
        self._store.append_audit(event, job_id=None if row is None else row.id)

    def _control(
        self, request: admin_pb2.JobControlRequest, method: str, action: str
    ) -> admin_pb2.JobStatus:
        caller = _current()
        job = self._job(request.job)
        requeue = action == "resume" and job.status in ("stopped", "failed")
        if requeue:
            self._need_intake()
        elif job.status not in ("queued", "running"):
            done = {"stop": "stopped", "pause": "paused", "resume": "resumed"}[action]
            raise _RefusedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job.name!r} is {job.status}; only a queued or running job can be {done}",
            )
        state = self._store.requested_control(job.name)
        if action == "pause" and state == "pause":
            raise _RefusedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job.name!r} is already paused; ResumeJob lifts the pause",
            )
        if action == "resume" and not requeue and state != "pause":
            raise _RefusedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {job.name!r} is not paused; nothing to resume",
            )
        self._audit(caller, job, method, action, request.reason)
        if action == "stop":
            self._store.set_job_status(job.id, "stopped")
        if requeue and self._intake is not None:
            self._store.submit_job(job.name, job.config)
            self._intake.wake()
        return self._status(self._job(job.name))


def _check_resubmit(job: Job, wanted: Mapping[str, object]) -> None:
    """Refuse to submit a job name again unless it is the same job, stopped or failed."""
    keys = _differing(dict(job.config), wanted)
    if keys:
        raise _RefusedError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"job {job.name!r} already exists with other settings ({', '.join(keys)} differ); "
            "give the new job another name",
        )
    if job.status in ("queued", "running"):
        raise _RefusedError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"job {job.name!r} is already {job.status}; `fedvault job list` shows the queue",
        )
    if job.status == "finished":
        raise _RefusedError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"job {job.name!r} already finished (its results stay readable: `fedvault status "
            f"--job {job.name}`); give a new job another name",
        )


def require_coordinator_kit(kit: Kit, service: str) -> None:
    """Refuse to serve ``service`` with any kit but the coordinator's.

    Raises
    ------
    InvalidConfigError
        ``kit`` is a hospital's or an operator's.
    """
    if kit.kind is not KitKind.COORDINATOR:
        raise InvalidConfigError(
            f"kit {kit.root} is the {kit.kind.value} kit of {kit.party!r}; {service} "
            "serves with the coordinator kit (OUT/coordinator from `fedvault provision`)"
        )


def serve(
    store_url: str,
    kit: Kit,
    *,
    address: str | None = None,
    max_workers: int = 4,
    intake: JobIntake | None = None,
) -> grpc.Server:
    """Start the operator API on the coordinator kit's ``operator_api`` address.

    Returns the started server; ``server.stop(grace)`` ends it and closes the
    store. ``address`` overrides the kit's (for tests). ``intake``: the coordinator
    service's job queue, which ``SubmitJob`` needs.

    Raises
    ------
    InvalidConfigError
        ``kit`` is not the coordinator's, or the address cannot be bound.
    StoreError
        The round store cannot be opened.
    """
    require_coordinator_kit(kit, "the operator API")
    target = address or kit.operator_api_address

    def read(path: Path) -> bytes:
        return kit.read(path.relative_to(kit.root).as_posix())

    credentials = grpc.ssl_server_credentials(
        [(read(kit.key_path), read(kit.cert_path))],
        root_certificates=read(kit.ca_path),
        require_client_auth=True,
    )
    store = RoundStore(store_url, at_rest_key=kit.at_rest_key())
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="operator-api"),
        interceptors=[AccessControl(store, kit.ca_cert)],
        # No SO_REUSEPORT: a second coordinator on the same port must fail, not share it.
        options=[("grpc.so_reuseport", 0)],
    )
    admin_pb2_grpc.add_OperatorServiceServicer_to_server(OperatorServicer(store, intake), server)
    try:
        port = server.add_secure_port(target, credentials)
    except RuntimeError:
        port = 0
    if not port:
        store.close()
        raise InvalidConfigError(
            f"cannot bind the operator API to {target}: the port is in use or the address is "
            "not local; stop the other process or change operator_api in the consortium file"
        )
    server.start()

    def close_store_after_stop() -> None:
        server.wait_for_termination()
        store.close()

    threading.Thread(target=close_store_after_stop, name="operator-api-closer", daemon=True).start()
    _log.info("operator API listening on %s", target)
    return server
