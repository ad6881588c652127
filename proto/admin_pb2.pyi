from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetAccessRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodAccess(_message.Message):
    __slots__ = ("method", "description", "required_role", "allowed")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_ROLE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    method: str
    description: str
    required_role: str
    allowed: bool
    def __init__(self, method: _Optional[str] = ..., description: _Optional[str] = ..., required_role: _Optional[str] = ..., allowed: _Optional[bool] = ...) -> None: ...

class GetAccessResponse(_message.Message):
    __slots__ = ("common_name", "role", "methods")
    COMMON_NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    common_name: str
    role: str
    methods: _containers.RepeatedCompositeFieldContainer[MethodAccess]
    def __init__(self, common_name: _Optional[str] = ..., role: _Optional[str] = ..., methods: _Optional[_Iterable[_Union[MethodAccess, _Mapping]]] = ...) -> None: ...

class GetJobStatusRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job", "status", "paused", "rounds_committed", "rounds_planned", "final_accuracy", "final_loss", "epsilon_max", "delta", "epsilon_budget", "final_metrics", "task")
    class FinalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PLANNED_FIELD_NUMBER: _ClassVar[int]
    FINAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_MAX_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    job: str
    status: str
    paused: bool
    rounds_committed: int
    rounds_planned: int
    final_accuracy: float
    final_loss: float
    epsilon_max: float
    delta: float
    epsilon_budget: float
    final_metrics: _containers.ScalarMap[str, float]
    task: str
    def __init__(self, job: _Optional[str] = ..., status: _Optional[str] = ..., paused: _Optional[bool] = ..., rounds_committed: _Optional[int] = ..., rounds_planned: _Optional[int] = ..., final_accuracy: _Optional[float] = ..., final_loss: _Optional[float] = ..., epsilon_max: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., final_metrics: _Optional[_Mapping[str, float]] = ..., task: _Optional[str] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "attempt", "status", "reason", "accuracy", "loss", "train_loss", "participants", "failures", "committed_at", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    status: str
    reason: str
    accuracy: float
    loss: float
    train_loss: float
    participants: int
    failures: int
    committed_at: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., accuracy: _Optional[float] = ..., loss: _Optional[float] = ..., train_loss: _Optional[float] = ..., participants: _Optional[int] = ..., failures: _Optional[int] = ..., committed_at: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("job", "rounds")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    job: str
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, job: _Optional[str] = ..., rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...

class ListParticipantsRequest(_message.Message):
    __slots__ = ("job", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("hospital", "status", "reason", "samples", "train_loss", "epsilon", "bytes_received", "eval_accuracy", "eval_loss")
    HOSPITAL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    hospital: str
    status: str
    reason: str
    samples: int
    train_loss: float
    epsilon: float
    bytes_received: int
    eval_accuracy: float
    eval_loss: float
    def __init__(self, hospital: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., samples: _Optional[int] = ..., train_loss: _Optional[float] = ..., epsilon: _Optional[float] = ..., bytes_received: _Optional[int] = ..., eval_accuracy: _Optional[float] = ..., eval_loss: _Optional[float] = ...) -> None: ...

class ListParticipantsResponse(_message.Message):
    __slots__ = ("job", "round", "attempt", "round_status", "participants")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATUS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    attempt: int
    round_status: str
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ..., round_status: _Optional[str] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ...) -> None: ...

class GetPrivacyLedgerRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("hospital", "round", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant")
    HOSPITAL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    hospital: str
    round: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    def __init__(self, hospital: _Optional[str] = ..., round: _Optional[int] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., accountant: _Optional[str] = ...) -> None: ...

class GetPrivacyLedgerResponse(_message.Message):
    __slots__ = ("job", "epsilon_budget", "entries")
    JOB_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    job: str
    epsilon_budget: float
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    def __init__(self, job: _Optional[str] = ..., epsilon_budget: _Optional[float] = ..., entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ...) -> None: ...

class GetAuditLogRequest(_message.Message):
    __slots__ = ("job", "limit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    limit: int
    def __init__(self, job: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "time", "kind", "actor", "job", "detail_json", "hash", "prev_hash")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: str
    kind: str
    actor: str
    job: str
    detail_json: str
    hash: str
    prev_hash: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[str] = ..., kind: _Optional[str] = ..., actor: _Optional[str] = ..., job: _Optional[str] = ..., detail_json: _Optional[str] = ..., hash: _Optional[str] = ..., prev_hash: _Optional[str] = ...) -> None: ...

class GetAuditLogResponse(_message.Message):
    __slots__ = ("events", "total", "chain_intact", "first_broken_id")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CHAIN_INTACT_FIELD_NUMBER: _ClassVar[int]
    FIRST_BROKEN_ID_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    total: int
    chain_intact: bool
    first_broken_id: int
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., total: _Optional[int] = ..., chain_intact: _Optional[bool] = ..., first_broken_id: _Optional[int] = ...) -> None: ...

class JobControlRequest(_message.Message):
    __slots__ = ("job", "reason")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job: str
    reason: str
    def __init__(self, job: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("job_toml", "reason")
    JOB_TOML_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_toml: str
    reason: str
    def __init__(self, job_toml: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class JobEntry(_message.Message):
    __slots__ = ("job", "status", "rounds_committed", "rounds_planned", "created_at", "updated_at", "queue_position", "task")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_PLANNED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    job: str
    status: str
    rounds_committed: int
    rounds_planned: int
    created_at: str
    updated_at: str
    queue_position: int
    task: str
    def __init__(self, job: _Optional[str] = ..., status: _Optional[str] = ..., rounds_committed: _Optional[int] = ..., rounds_planned: _Optional[int] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., queue_position: _Optional[int] = ..., task: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HospitalEpsilon(_message.Message):
    __slots__ = ("hospital", "per_job", "total", "delta_total")
    class PerJobEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HOSPITAL_FIELD_NUMBER: _ClassVar[int]
    PER_JOB_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DELTA_TOTAL_FIELD_NUMBER: _ClassVar[int]
    hospital: str
    per_job: _containers.ScalarMap[str, float]
    total: float
    delta_total: float
    def __init__(self, hospital: _Optional[str] = ..., per_job: _Optional[_Mapping[str, float]] = ..., total: _Optional[float] = ..., delta_total: _Optional[float] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "epsilon", "epsilon_visible")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_VISIBLE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobEntry]
    epsilon: _containers.RepeatedCompositeFieldContainer[HospitalEpsilon]
    epsilon_visible: bool
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobEntry, _Mapping]]] = ..., epsilon: _Optional[_Iterable[_Union[HospitalEpsilon, _Mapping]]] = ..., epsilon_visible: _Optional[bool] = ...) -> None: ...
