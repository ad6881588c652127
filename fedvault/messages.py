"""The message contract between the coordinator's ServerApp and a hospital's ClientApp.

Both sides import this leaf module (never each other). It fixes the record
keys and how a model travels inside a Flower :class:`~flwr.app.Message`:

* ``he`` mode: one serialized ``UpdateEnvelope`` (HE ciphertexts + layout)
  carried as a ``uint8`` array, so Flower's own chunking moves large models;
* ``none`` mode: the named float arrays themselves.

The key ceremony's requests and replies are typed here too (``HelloRequest``
… ``InstallKeyReply``), and every refusal carries a :class:`RefusalCode`
beside its human ``reason``: the coordinator decides on the code, never on
the text.

Everything that arrives from the other side is parsed defensively: an
oversized reply (checked before anything is decoded), an unexpected message
type or record, a missing key, a wrong type, a non-finite or out-of-range
number raises :class:`MalformedUpdateError` with the offending field named.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, TypedDict, TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SType

from fedvault.config import JobConfig
from fedvault.errors import (
    BudgetExhaustedError,
    DataError,
    FedvaultError,
    InvalidConfigError,
    KeyMismatchError,
    MalformedUpdateError,
    PolicyRefusalError,
    SecretKeyExposureError,
    StoreError,
    TaskMismatchError,
)
from fedvault.npz import array_from_npy
from fedvault.privacy.secagg import RoundContext
from fedvault.privacy.secagg_messages import UnmaskReply, UnmaskRequest

__all__ = [
    "CEREMONY_KEY",
    "ENVELOPE_KEY",
    "MAX_SAMPLES",
    "MAX_SUMMARY_BYTES",
    "SUMMARY_KEY",
    "SUMMARY_ZLIB",
    "UNMASK_KEY",
    "CeremonyReply",
    "CeremonyRequest",
    "EvalReply",
    "HelloReply",
    "HelloRequest",
    "InstallKeyReply",
    "InstallKeyRequest",
    "ModelPayload",
    "RefusalCode",
    "ReplyStatus",
    "RoundInstruction",
    "SealKeyReply",
    "SealKeyRequest",
    "TrainReply",
    "UnmaskAnswer",
    "UnmaskQuery",
    "ceremony_request",
    "content_nbytes",
    "instruction_config",
    "pack_summary",
    "payload_from_record",
    "payload_to_record",
    "refusal_code",
    "refusal_reason",
    "round_context",
]

_R = TypeVar("_R", ConfigRecord, MetricRecord, ArrayRecord)

MODEL_KEY = "model"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATUS_KEY = "status"
ENVELOPE_KEY = "he-envelope"
CEREMONY_KEY = "ceremony"  # key-ceremony queries and replies (a ConfigRecord)
SUMMARY_KEY = "job-summary"  # the final report, sent to hospitals when a job ends
UNMASK_KEY = "secagg.unmask"  # masked rounds' unmask requests and replies (QUERY)

#: The job summary travels zlib-compressed under this config key: the same text in
#: every hospital's instruction (37.7 KB at 100 hospitals and 9 rounds, 2.7 KB
#: compressed), which cost the simulated 100-hospital round ~40 ms of Flower's
#: transport (bench/README.md, round overhead). A hospital of an older version
#: reads only ``summary``, left empty: it keeps no summary that round, and trains.
SUMMARY_ZLIB = "summary-zlib"
#: Largest summary a hospital expands (a corrupt or hostile one stops here).
MAX_SUMMARY_BYTES = 32 * 2**20

#: Largest sample count a reply may claim: the round store keeps counts in
#: 32-bit columns, and no hospital holds two billion records.
MAX_SAMPLES = 2**31 - 1
_MAX_STEPS = 2**63 - 1
# Hospital names as provisioning allows them (fedvault.app.provision), or "node-<id>".
_HOSPITAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ReplyStatus(StrEnum):
    """Whether a hospital answered a request (``ok``) or declined it (``refused``)."""

    OK = "ok"
    REFUSED = "refused"  # the hospital declined on purpose (budget, key epoch, data)


class RefusalCode(StrEnum):
    """Why a hospital refused, for the coordinator's decisions; ``reason`` is for people.

    Every refusal a hospital sends carries one (:func:`refusal_code` derives it
    from the error it refuses with). A refusal without a code comes from a
    hospital running an older fedvault: it parses as :attr:`UNKNOWN`, which
    the coordinator treats like :attr:`INTERNAL` (retryable), never by reading
    the text. A code this version does not know is malformed, like an unknown
    status.
    """

    BUDGET_EXHAUSTED = "budget_exhausted"  # BudgetExhaustedError: the privacy budget is spent
    POLICY = "policy"  # PolicyRefusalError: the site policy does not allow this job
    TASK_MISMATCH = "task_mismatch"  # TaskMismatchError: other task code or architecture
    CONFIG = "config"  # InvalidConfigError: node config, a task it cannot load, a job value
    KEY_MISMATCH = "key_mismatch"  # KeyMismatchError: another HE key, key epoch or kit
    KEY_EXPOSURE = "key_exposure"  # SecretKeyExposureError: a secret context would leave
    MALFORMED = "malformed"  # MalformedUpdateError: the request could not be parsed
    DATA = "data"  # DataError: the hospital's data is missing, malformed or too small
    INTERNAL = "internal"  # StoreError, or any other failure at the hospital
    UNKNOWN = "unknown"  # only parsed: a refusal that carried no code (an older hospital)


# Most specific first is not needed: refusal_code walks the error's MRO.
_REFUSAL_CODES: dict[type[BaseException], RefusalCode] = {
    BudgetExhaustedError: RefusalCode.BUDGET_EXHAUSTED,
    PolicyRefusalError: RefusalCode.POLICY,
    TaskMismatchError: RefusalCode.TASK_MISMATCH,
    InvalidConfigError: RefusalCode.CONFIG,
    KeyMismatchError: RefusalCode.KEY_MISMATCH,
    SecretKeyExposureError: RefusalCode.KEY_EXPOSURE,
    MalformedUpdateError: RefusalCode.MALFORMED,
    DataError: RefusalCode.DATA,
    StoreError: RefusalCode.INTERNAL,
    FedvaultError: RefusalCode.INTERNAL,
}


def refusal_code(exc: BaseException) -> RefusalCode:
    """The code a hospital refuses with when ``exc`` stops it (INTERNAL if none fits)."""
    for cls in type(exc).__mro__:
        if (code := _REFUSAL_CODES.get(cls)) is not None:
            return code
    return RefusalCode.INTERNAL


def refusal_reason(exc: BaseException) -> str:
    """The human text of a refusal: the error's class and message."""
    return f"{type(exc).__name__}: {exc}"


def _check_refusal(status: ReplyStatus, code: RefusalCode | None) -> RefusalCode | None:
    """A refusal always has a code (UNKNOWN if none was given); an accepted reply none."""
    if status is ReplyStatus.OK:
        if code is not None:
            raise MalformedUpdateError(
                f"an accepted reply carries refusal code {code.value!r}; {_DISCARD}"
            )
        return None
    return RefusalCode.UNKNOWN if code is None else code


@dataclass(frozen=True)
class ModelPayload:
    """A global model or an update: exactly one of ``envelope`` / ``arrays`` is set."""

    envelope: bytes | None = None
    arrays: Mapping[str, np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        """The payload's size in bytes: the envelope's, or the arrays' data."""
        if self.envelope is not None:
            return len(self.envelope)
        return sum(int(a.nbytes) for a in (self.arrays or {}).values())


def payload_to_record(payload: ModelPayload) -> ArrayRecord:
    """The payload as a Flower ``ArrayRecord`` (an envelope as one uint8 array)."""
    if payload.envelope is not None:
        buf = np.frombuffer(payload.envelope, dtype=np.uint8)
        return ArrayRecord({ENVELOPE_KEY: Array(buf)})
    if payload.arrays is None:
        raise MalformedUpdateError("empty model payload")
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.arrays.items()})


def payload_from_record(record: ArrayRecord) -> ModelPayload:
    """The payload an ``ArrayRecord`` carries; :class:`MalformedUpdateError` if malformed."""
    if ENVELOPE_KEY in record:
        if len(record) != 1:
            raise MalformedUpdateError(
                "encrypted payload carries extra plaintext arrays; discard it (a hospital "
                "must never send plaintext weights in an encrypted job)"
            )
        data = _numpy(record[ENVELOPE_KEY], ENVELOPE_KEY)
        if data.dtype != np.uint8 or data.ndim != 1:
            raise MalformedUpdateError(
                f"encrypted payload is not a byte string (dtype {data.dtype}, shape "
                f"{data.shape}); the sender must send the serialized envelope as uint8"
            )
        if data.size == 0:
            raise MalformedUpdateError("encrypted payload is empty; the sender must resend it")
        return ModelPayload(envelope=data.tobytes())
    if len(record) == 0:
        raise MalformedUpdateError("model payload holds no arrays")
    return ModelPayload(arrays={k: _numpy(v, k) for k, v in record.items()})


def _numpy(array: Array, name: str) -> np.ndarray:
    if array.stype != SType.NUMPY:
        raise MalformedUpdateError(
            f"array {name!r} cannot be decoded (serialized as {array.stype!r}, not numpy); "
            "the sender runs another protocol version, discard it"
        )
    try:
        return array_from_npy(array.data, array.dtype, array.shape)
    except (ValueError, TypeError, EOFError) as exc:  # what numpy's .npy reader raises
        raise MalformedUpdateError(
            f"array {name!r} cannot be decoded ({exc}); it is corrupt, the sender must resend it"
        ) from exc


def _record(content: RecordDict, key: str, kind: type[_R]) -> _R:
    """``content[key]`` if it is a ``kind`` record, else ``KeyError`` (as Flower's typed views).

    Flower's ``content.config_records`` and its kin copy every record of that kind
    into a new checked dict on each access: three of them were a quarter of
    parsing a reply.
    """
    record = content.get(key)
    if not isinstance(record, kind):
        raise KeyError(key)
    return record


def content_nbytes(content: RecordDict) -> int:
    """Bytes a message's records carry, counted without decoding any of them."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    total += len(item) if isinstance(item, str | bytes) else 8
        else:
            total += 8 * sum(len(v) if isinstance(v, list) else 1 for v in record.values())
    return total


def _check_message(
    msg: Message, what: str, expected_type: str, keys: frozenset[str], max_bytes: int | None
) -> None:
    """The checks that come before any record is decoded: type, size, record names."""
    message_type = msg.metadata.message_type
    if message_type != expected_type:
        raise MalformedUpdateError(
            f"unexpected message type {message_type!r} in reply to a {expected_type!r} "
            f"instruction; discard it (the sender runs another app or protocol version)"
        )
    if max_bytes is not None and (size := content_nbytes(msg.content)) > max_bytes:
        raise MalformedUpdateError(
            f"{what} carries {size} bytes, more than this job's max_update_bytes={max_bytes}; "
            "discarded unread. If the model really is this large, raise max_update_bytes "
            "in the job configuration"
        )
    unexpected = sorted(set(msg.content.keys()) - keys)
    if unexpected:
        shown = [k[:40] for k in unexpected[:5]]
        raise MalformedUpdateError(
            f"{what} carries unexpected records {shown} (expected only {sorted(keys)}); "
            "discard it (the sender runs another protocol version)"
        )


# --- coordinator -> hospital ---------------------------------------------------


@dataclass(frozen=True)
class RoundInstruction:
    """What the coordinator asks of a hospital for one round.

    ``task_fingerprint`` is the coordinator's fingerprint of the job's task
    (JSON, :class:`~fedvault.fingerprint.TaskFingerprint`): the hospital
    refuses before training if its own differs. ``summary`` is the job's
    report so far (JSON: per-round metrics, each hospital's privacy spend),
    which the hospital keeps beside the model versions it receives, for the
    model card of an export.
    """

    job: JobConfig
    server_round: int
    key_epoch: int
    model: ModelPayload
    task_fingerprint: str = ""
    summary: str = ""
    # Masked rounds (docs/secagg.md): every hospital sent this attempt's
    # instruction, and the attempt; empty for an unmasked round.
    participants: tuple[str, ...] = ()
    attempt: int = 0

    def to_content(self) -> RecordDict:
        """The instruction as message content: the model and a config record."""
        config = instruction_config(
            self.job.to_json(),
            self.server_round,
            self.key_epoch,
            self.task_fingerprint,
            self.summary,
        )
        config["participants"] = list(self.participants)
        config["attempt"] = self.attempt
        return RecordDict({MODEL_KEY: payload_to_record(self.model), CONFIG_KEY: config})

    def round_context(self) -> RoundContext:
        """The masked round this instruction opens (see :func:`round_context`)."""
        return round_context(
            self.job.job,
            self.server_round,
            self.key_epoch,
            self.model,
            self.participants,
            self.attempt,
        )

    @classmethod
    def from_message(cls, msg: Message) -> RoundInstruction:
        """Parse and validate the coordinator's instruction for one round."""
        content = msg.content
        try:
            config = _record(content, CONFIG_KEY, ConfigRecord)
            model = _record(content, MODEL_KEY, ArrayRecord)
            job = JobConfig.from_json(str(config["job-config"]))
            server_round = _int(config["server-round"], "server-round")
            key_epoch = _int(config["key-epoch"], "key-epoch")
        except KeyError as exc:
            raise MalformedUpdateError(f"round instruction lacks {exc}") from exc
        return cls(
            job=job,
            server_round=server_round,
            key_epoch=key_epoch,
            model=payload_from_record(model),
            task_fingerprint=_text(config.get("task-fingerprint", ""), "task-fingerprint"),
            summary=_summary(config),
            participants=_hospitals(config.get("participants", []), "participants"),
            attempt=_int(config.get("attempt", 0), "attempt"),
        )


def round_context(
    job: str,
    server_round: int,
    key_epoch: int,
    model: ModelPayload,
    participants: Sequence[str],
    attempt: int,
) -> RoundContext:
    """The :class:`RoundContext` of one masked training attempt, the same at every party.

    Its nonce is a digest of the instruction (job, round, key epoch, the global
    model's bytes) and the attempt: a hospital that would compute a new update
    always gets a new context, so masks never repeat.
    """
    h = hashlib.sha256(f"{job}\0{server_round}\0{key_epoch}\0{attempt}\0".encode())
    h.update(model.envelope or b"")
    for name, array in sorted((model.arrays or {}).items()):
        h.update(name.encode() + b"\0" + str(array.dtype).encode() + str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return RoundContext(job, server_round, tuple(participants), h.digest())


# --- hospital -> coordinator ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrainReply:
    """A hospital's answer to a train instruction."""

    hospital: str
    status: ReplyStatus
    reason: str = ""
    code: RefusalCode | None = None  # set exactly when refused (see RefusalCode)
    update: ModelPayload | None = None
    samples: int = 0
    train_loss: float = 0.0
    epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0  # cumulative DP-SGD steps in this job
    round_steps: int = 0
    accountant: str = ""
    accountant_state: str = ""
    # The hospital also evaluates the global model it received (the previous
    # round's aggregate) on its held-out data: one message per round, not two.
    eval_accuracy: float = 0.0
    eval_loss: float = 0.0
    eval_samples: int = 0
    # The task's metrics and pooling statistics of that evaluation
    # (fedvault.metrics.EvalResult as JSON; validated by the coordinator,
    # which knows the task's kind); empty when nothing was evaluated.
    evaluation: str = ""
    # Masked rounds: the hospital's sealed shares and commitments
    # (privacy.secagg_messages.MaskedShares as JSON); empty otherwise.
    masked_shares: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", _check_refusal(self.status, self.code))

    def to_content(self) -> RecordDict:
        """The reply as message content: status, metrics and (when accepted) the update."""
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            STATUS_KEY: ConfigRecord(
                {
                    "hospital": self.hospital,
                    "status": self.status.value,
                    "reason": self.reason,
                    "code": _code_text(self.code),
                    "accountant": self.accountant,
                    "accountant-state": self.accountant_state,
                    "evaluation": self.evaluation,
                    "masked-shares": self.masked_shares,
                }
            ),
            METRICS_KEY: MetricRecord(
                {
                    "num-examples": self.samples,
                    "train-loss": self.train_loss,
                    "epsilon": self.epsilon,
                    "delta": self.delta,
                    "noise-multiplier": self.noise_multiplier,
                    "sample-rate": self.sample_rate,
                    "steps": self.steps,
                    "round-steps": self.round_steps,
                    "eval-accuracy": self.eval_accuracy,
                    "eval-loss": self.eval_loss,
                    "eval-num-examples": self.eval_samples,
                }
            ),
        }
        if self.update is not None:
            records[MODEL_KEY] = payload_to_record(self.update)
        return RecordDict(records)

    @classmethod
    def from_message(cls, msg: Message, *, max_bytes: int | None = None) -> TrainReply:
        """Parse and validate a hospital's reply to a train instruction.

        ``max_bytes`` (the job's ``max_update_bytes``) is enforced before any
        record is decoded.
        """
        keys = frozenset({STATUS_KEY, METRICS_KEY, MODEL_KEY})
        _check_message(msg, "train reply", MessageType.TRAIN, keys, max_bytes)
        content = msg.content
        try:
            status = _record(content, STATUS_KEY, ConfigRecord)
            metrics = _record(content, METRICS_KEY, MetricRecord)
            hospital = _hospital(status["hospital"])
            state = _status(status["status"])
            reply = cls(
                hospital=hospital,
                status=state,
                reason=_text(status.get("reason", ""), "reason"),
                code=_code(status.get("code", ""), state),
                update=(
                    payload_from_record(_record(content, MODEL_KEY, ArrayRecord))
                    if state is ReplyStatus.OK
                    else None
                ),
                samples=_int(metrics["num-examples"], "num-examples"),
                train_loss=_finite(metrics["train-loss"], "train-loss"),
                epsilon=_finite(metrics["epsilon"], "epsilon"),
                delta=_finite(metrics["delta"], "delta"),
                noise_multiplier=_finite(metrics["noise-multiplier"], "noise-multiplier"),
                sample_rate=_finite(metrics["sample-rate"], "sample-rate"),
                steps=_int(metrics["steps"], "steps"),
                round_steps=_int(metrics["round-steps"], "round-steps"),
                accountant=_text(status.get("accountant", ""), "accountant"),
                accountant_state=_json_object(
                    status.get("accountant-state", ""), "accountant-state"
                ),
                eval_accuracy=_finite(metrics.get("eval-accuracy", 0.0), "eval-accuracy"),
                eval_loss=_finite(metrics.get("eval-loss", 0.0), "eval-loss"),
                eval_samples=_int(metrics.get("eval-num-examples", 0), "eval-num-examples"),
                evaluation=_text(status.get("evaluation", ""), "evaluation"),
                masked_shares=_text(status.get("masked-shares", ""), "masked-shares"),
            )
        except KeyError as exc:
            raise MalformedUpdateError(
                f"train reply lacks {exc}; the sender runs another protocol version, discard it"
            ) from exc
        except ValueError as exc:
            if isinstance(exc, MalformedUpdateError):
                raise
            raise MalformedUpdateError(f"train reply is malformed: {exc}") from exc
        _in_range(reply.eval_accuracy, "eval-accuracy", 0.0, 1.0)
        _in_range(reply.epsilon, "epsilon", 0.0, math.inf)
        _in_range(reply.delta, "delta", 0.0, 1.0, high_open=True)
        _in_range(reply.noise_multiplier, "noise-multiplier", 0.0, math.inf)
        _in_range(reply.sample_rate, "sample-rate", 0.0, 1.0)
        _in_range(reply.samples, "num-examples", 0, MAX_SAMPLES)
        _in_range(reply.eval_samples, "eval-num-examples", 0, MAX_SAMPLES)
        _in_range(reply.steps, "steps", 0, _MAX_STEPS)
        _in_range(reply.round_steps, "round-steps", 0, _MAX_STEPS)
        if state is ReplyStatus.OK and reply.samples <= 0:
            raise MalformedUpdateError(
                f"{hospital}: num-examples (the sample weight) must be > 0 (got "
                f"{reply.samples}); a hospital with no samples must refuse the round"
            )
        return reply


@dataclass(frozen=True, kw_only=True)
class EvalReply:
    """A hospital's evaluation of the global model on its held-out data, or its refusal."""

    hospital: str
    status: ReplyStatus
    reason: str = ""
    code: RefusalCode | None = None  # as TrainReply.code
    accuracy: float = 0.0
    loss: float = 0.0
    samples: int = 0
    evaluation: str = ""  # as TrainReply.evaluation

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", _check_refusal(self.status, self.code))

    def to_content(self) -> RecordDict:
        """The reply as message content: a status and a metrics record."""
        return RecordDict(
            {
                STATUS_KEY: ConfigRecord(
                    {
                        "hospital": self.hospital,
                        "status": self.status.value,
                        "reason": self.reason,
                        "code": _code_text(self.code),
                        "evaluation": self.evaluation,
                    }
                ),
                METRICS_KEY: MetricRecord(
                    {"accuracy": self.accuracy, "loss": self.loss, "num-examples": self.samples}
                ),
            }
        )

    @classmethod
    def from_message(cls, msg: Message, *, max_bytes: int | None = None) -> EvalReply:
        """Parse and validate a hospital's evaluation reply, no larger than ``max_bytes``."""
        keys = frozenset({STATUS_KEY, METRICS_KEY})
        _check_message(msg, "evaluation reply", MessageType.EVALUATE, keys, max_bytes)
        content = msg.content
        try:
            status = _record(content, STATUS_KEY, ConfigRecord)
            metrics = _record(content, METRICS_KEY, MetricRecord)
            state = _status(status["status"])
            reply = cls(
                hospital=_hospital(status["hospital"]),
                status=state,
                reason=_text(status.get("reason", ""), "reason"),
                code=_code(status.get("code", ""), state),
                accuracy=_finite(metrics["accuracy"], "accuracy"),
                loss=_finite(metrics["loss"], "loss"),
                samples=_int(metrics["num-examples"], "num-examples"),
                evaluation=_text(status.get("evaluation", ""), "evaluation"),
            )
        except KeyError as exc:
            raise MalformedUpdateError(
                f"evaluation reply lacks {exc}; the sender runs another protocol version, "
                "discard it"
            ) from exc
        except ValueError as exc:
            if isinstance(exc, MalformedUpdateError):
                raise
            raise MalformedUpdateError(f"evaluation reply is malformed: {exc}") from exc
        _in_range(reply.accuracy, "accuracy", 0.0, 1.0)
        _in_range(reply.samples, "num-examples", 0, MAX_SAMPLES)
        return reply


# --- key ceremony (coordinator <-> hospital, QUERY messages) ----------------------
#
# Each request and reply travels as one ConfigRecord under CEREMONY_KEY. The
# coordinator relays (see fedvault.coordinator.key_ceremony); the hospital
# answers (fedvault.client.client_app). A refusal of any request is a plain
# CeremonyReply with a code, which every reply type parses.

_CEREMONY_REQUEST = "key-ceremony request"
_CEREMONY_REPLY = "key-ceremony reply"


def _ceremony_content(fields: Mapping[str, ConfigRecordValues]) -> RecordDict:
    return RecordDict({CEREMONY_KEY: ConfigRecord(dict(fields))})


def _ceremony_record(msg: Message, *, request: bool, action: str | None = None) -> ConfigRecord:
    """The ceremony record of a reply, or of a request (for ``action``, if given)."""
    what = _CEREMONY_REQUEST if request else _CEREMONY_REPLY
    if not request:
        _check_message(msg, what, MessageType.QUERY, frozenset({CEREMONY_KEY}), None)
    elif unexpected := sorted(set(msg.content.keys()) - {CEREMONY_KEY}):
        raise MalformedUpdateError(
            f"{what} carries unexpected records {[k[:40] for k in unexpected[:5]]} (expected "
            f"only {CEREMONY_KEY!r}); the coordinator runs another protocol version"
        )
    if CEREMONY_KEY not in msg.content.config_records:
        raise MalformedUpdateError(
            f"{what} carries no {CEREMONY_KEY!r} config record; the sender runs another "
            "protocol version, discard it"
        )
    record = msg.content.config_records[CEREMONY_KEY]
    if action is not None and (got := _text(_get(record, "action", what), "action")) != action:
        raise MalformedUpdateError(f"{what} is a {got[:40]!r} request, not {action!r}")
    return record


def _get(record: ConfigRecord, key: str, what: str) -> ConfigRecordValues:
    try:
        return record[key]
    except KeyError:
        raise MalformedUpdateError(
            f"{what} lacks {key!r}; the sender runs another protocol version, discard it"
        ) from None


def _epoch(value: object, name: str = "epoch") -> int:
    epoch = _int(value, name)
    if epoch < 1:
        raise MalformedUpdateError(f"key {name} must be >= 1 (got {epoch}); {_DISCARD}")
    return epoch


def _bytes(value: object, name: str) -> bytes:
    if not isinstance(value, bytes) or not value:
        got = "empty bytes" if isinstance(value, bytes) else type(value).__name__
        raise MalformedUpdateError(f"config field {name} must be non-empty bytes (got {got})")
    return value


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise MalformedUpdateError(
            f"config field {name} must be a boolean (got {type(value).__name__}); {_DISCARD}"
        )
    return value


def _list(value: object, name: str) -> list[object]:
    if not isinstance(value, list):
        raise MalformedUpdateError(
            f"config field {name} must be a list (got {type(value).__name__}); {_DISCARD}"
        )
    return list(value)


def _hospitals(value: object, name: str) -> tuple[str, ...]:
    """Distinct hospital names (the coordinator files envelopes under them)."""
    names = tuple(_hospital(v) for v in _list(value, name))
    if len(set(names)) != len(names):
        raise MalformedUpdateError(f"config field {name} names a hospital twice; {_DISCARD}")
    return names


@dataclass(frozen=True)
class HelloRequest:
    """Coordinator -> every node: asks which hospital it is and which key epochs it holds."""

    ACTION: ClassVar[str] = "hello"

    def to_content(self) -> RecordDict:
        """The request as key-ceremony message content."""
        return _ceremony_content({"action": self.ACTION})

    @classmethod
    def from_message(cls, msg: Message) -> HelloRequest:
        """Parse and validate a hello request."""
        _ceremony_record(msg, request=True, action=cls.ACTION)
        return cls()


@dataclass(frozen=True)
class SealKeyRequest:
    """Coordinator -> the custodian: make (or reuse) ``epoch``'s key, seal it for ``recipients``."""

    ACTION: ClassVar[str] = "key-ceremony"
    epoch: int
    recipients: tuple[str, ...] = ()

    def to_content(self) -> RecordDict:
        """The request as key-ceremony message content."""
        return _ceremony_content(
            {"action": self.ACTION, "epoch": self.epoch, "recipients": list(self.recipients)}
        )

    @classmethod
    def from_message(cls, msg: Message) -> SealKeyRequest:
        """Parse and validate a seal-key request."""
        record = _ceremony_record(msg, request=True, action=cls.ACTION)
        return cls(
            epoch=_epoch(_get(record, "epoch", _CEREMONY_REQUEST)),
            recipients=_hospitals(_get(record, "recipients", _CEREMONY_REQUEST), "recipients"),
        )


@dataclass(frozen=True)
class InstallKeyRequest:
    """Coordinator -> a hospital: the envelope the custodian sealed for it, to open and keep."""

    ACTION: ClassVar[str] = "install-key"
    epoch: int
    envelope: bytes
    custodian_cert: bytes  # PEM: the envelope must be signed by this certificate's key
    fingerprint: str  # of the epoch's public context: the opened key must match it

    def to_content(self) -> RecordDict:
        """The request as key-ceremony message content."""
        return _ceremony_content(
            {
                "action": self.ACTION,
                "epoch": self.epoch,
                "envelope": self.envelope,
                "custodian-cert": self.custodian_cert,
                "fingerprint": self.fingerprint,
            }
        )

    @classmethod
    def from_message(cls, msg: Message) -> InstallKeyRequest:
        """Parse and validate an install-key request."""
        record = _ceremony_record(msg, request=True, action=cls.ACTION)
        fingerprint = _text(_get(record, "fingerprint", _CEREMONY_REQUEST), "fingerprint")
        if not fingerprint:
            raise MalformedUpdateError("install-key request has an empty fingerprint")
        return cls(
            epoch=_epoch(_get(record, "epoch", _CEREMONY_REQUEST)),
            envelope=_bytes(_get(record, "envelope", _CEREMONY_REQUEST), "envelope"),
            custodian_cert=_bytes(
                _get(record, "custodian-cert", _CEREMONY_REQUEST), "custodian-cert"
            ),
            fingerprint=fingerprint,
        )


CeremonyRequest = HelloRequest | SealKeyRequest | InstallKeyRequest
_REQUESTS: dict[str, type[CeremonyRequest]] = {
    r.ACTION: r for r in (HelloRequest, SealKeyRequest, InstallKeyRequest)
}


def ceremony_request(msg: Message) -> CeremonyRequest:
    """Parse a key-ceremony request of any action (the hospital's side)."""
    record = _ceremony_record(msg, request=True)
    action = _text(_get(record, "action", _CEREMONY_REQUEST), "action")
    if action not in _REQUESTS:
        raise MalformedUpdateError(
            f"unknown key-ceremony action {action[:40]!r} (expected one of "
            f"{sorted(_REQUESTS)}); the coordinator runs another protocol version"
        )
    return _REQUESTS[action].from_message(msg)


class _ReplyState(TypedDict):
    """What every key-ceremony reply carries."""

    hospital: str
    status: ReplyStatus
    reason: str
    code: RefusalCode | None


@dataclass(frozen=True, kw_only=True)
class CeremonyReply:
    """A hospital's answer to a key-ceremony request; on its own, the refusal of one.

    Every reply type below extends it, and parses a refusal (``status``
    refused, ``reason`` and ``code`` set, nothing else) as well as its answer.
    """

    hospital: str
    status: ReplyStatus = ReplyStatus.OK
    reason: str = ""
    code: RefusalCode | None = None  # as TrainReply.code

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", _check_refusal(self.status, self.code))

    def _common(self) -> dict[str, ConfigRecordValues]:
        return {
            "hospital": self.hospital,
            "status": self.status.value,
            "reason": self.reason,
            "code": _code_text(self.code),
        }

    @staticmethod
    def _parse_common(record: ConfigRecord) -> _ReplyState:
        status = _status(_get(record, "status", _CEREMONY_REPLY))
        return _ReplyState(
            hospital=_hospital(_get(record, "hospital", _CEREMONY_REPLY)),
            status=status,
            reason=_text(record.get("reason", ""), "reason"),
            code=_code(record.get("code", ""), status),
        )

    def to_content(self) -> RecordDict:
        """The reply as key-ceremony message content."""
        return _ceremony_content(self._common())

    @classmethod
    def from_message(cls, msg: Message) -> CeremonyReply:
        """Parse and validate a bare key-ceremony reply (a refusal, or an answer's common part)."""
        common = cls._parse_common(_ceremony_record(msg, request=False))
        return CeremonyReply(**common)


@dataclass(frozen=True, kw_only=True)
class HelloReply(CeremonyReply):
    """A node's answer to hello: the hospital it speaks for and the key epochs it holds."""

    epochs: tuple[int, ...] = ()  # the key epochs whose secret context the hospital holds
    custodian: bool = False  # whether its kit makes it the consortium's key custodian

    def to_content(self) -> RecordDict:
        """The reply as key-ceremony message content (epochs and custodian when OK)."""
        fields = self._common()
        if self.status is ReplyStatus.OK:
            fields |= {"epochs": list(self.epochs), "custodian": self.custodian}
        return _ceremony_content(fields)

    @classmethod
    def from_message(cls, msg: Message) -> HelloReply:
        """Parse and validate a hello reply."""
        record = _ceremony_record(msg, request=False)
        common = cls._parse_common(record)
        if common["status"] is not ReplyStatus.OK:
            return cls(**common)
        epochs = _list(_get(record, "epochs", _CEREMONY_REPLY), "epochs")
        return cls(
            **common,
            epochs=tuple(_epoch(e, "epochs") for e in epochs),
            custodian=_bool(_get(record, "custodian", _CEREMONY_REPLY), "custodian"),
        )


@dataclass(frozen=True, kw_only=True)
class SealKeyReply(CeremonyReply):
    """The custodian's answer: the epoch's public context and one envelope per recipient."""

    public_context: bytes = b""  # serialized without the secret key (the coordinator checks)
    custodian_cert: bytes = b""  # PEM, for recipients to verify the envelopes' signatures
    envelopes: Mapping[str, bytes] = field(default_factory=dict)  # recipient -> sealed key

    def to_content(self) -> RecordDict:
        """The reply as key-ceremony message content (context, cert and envelopes when OK)."""
        fields = self._common()
        if self.status is ReplyStatus.OK:
            fields |= {
                "public-context": self.public_context,
                "custodian-cert": self.custodian_cert,
                "recipients": list(self.envelopes),
                "envelopes": list(self.envelopes.values()),
            }
        return _ceremony_content(fields)

    @classmethod
    def from_message(cls, msg: Message) -> SealKeyReply:
        """Parse and validate the custodian's seal-key reply."""
        record = _ceremony_record(msg, request=False)
        common = cls._parse_common(record)
        if common["status"] is not ReplyStatus.OK:
            return cls(**common)
        names = _hospitals(_get(record, "recipients", _CEREMONY_REPLY), "recipients")
        blobs = _list(_get(record, "envelopes", _CEREMONY_REPLY), "envelopes")
        if len(names) != len(blobs):
            raise MalformedUpdateError(
                f"{_CEREMONY_REPLY} names {len(names)} recipients but carries {len(blobs)} "
                f"envelopes; {_DISCARD}"
            )
        return cls(
            **common,
            public_context=_bytes(
                _get(record, "public-context", _CEREMONY_REPLY), "public-context"
            ),
            custodian_cert=_bytes(
                _get(record, "custodian-cert", _CEREMONY_REPLY), "custodian-cert"
            ),
            envelopes={n: _bytes(b, f"envelopes[{n}]") for n, b in zip(names, blobs, strict=True)},
        )


@dataclass(frozen=True, kw_only=True)
class InstallKeyReply(CeremonyReply):
    """A recipient's answer: the fingerprint of the key it opened and now keeps."""

    fingerprint: str = ""

    def to_content(self) -> RecordDict:
        """The reply as key-ceremony message content (the fingerprint when OK)."""
        fields = self._common()
        if self.status is ReplyStatus.OK:
            fields["fingerprint"] = self.fingerprint
        return _ceremony_content(fields)

    @classmethod
    def from_message(cls, msg: Message) -> InstallKeyReply:
        """Parse and validate an install-key reply."""
        record = _ceremony_record(msg, request=False)
        common = cls._parse_common(record)
        if common["status"] is not ReplyStatus.OK:
            return cls(**common)
        fingerprint = _text(_get(record, "fingerprint", _CEREMONY_REPLY), "fingerprint")
        if not fingerprint:
            raise MalformedUpdateError(f"{_CEREMONY_REPLY} has an empty fingerprint; {_DISCARD}")
        return cls(**common, fingerprint=fingerprint)


_DISCARD = "the sender's reply is corrupt or from another version, discard it"


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedUpdateError(
            f"{name} must be a number (got {type(value).__name__}); {_DISCARD}"
        )
    if not math.isfinite(value):
        raise MalformedUpdateError(
            f"{name} must be finite (got {value}); the sender's training diverged or its "
            "reply is corrupt, discard it"
        )
    return float(value)


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedUpdateError(f"{name} must be an integer (got {value!r}); {_DISCARD}")
    if value < 0:
        raise MalformedUpdateError(f"{name} must be >= 0 (got {value}); {_DISCARD}")
    return value


def _in_range(value: float, name: str, low: float, high: float, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        bracket = ")" if high_open else "]"
        raise MalformedUpdateError(
            f"{name} must be in [{low}, {high}{bracket} (got {value}); the sender's "
            "accounting is broken, discard the reply"
        )


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise MalformedUpdateError(
            f"config field {name} must be text (got {type(value).__name__}); {_DISCARD}"
        )
    return value


def instruction_config(
    job_json: str,
    server_round: int,
    key_epoch: int,
    task_fingerprint: str,
    summary: str,
) -> ConfigRecord:
    """A round instruction's config record, as :meth:`RoundInstruction.from_message` reads it.

    A masked round adds its ``participants`` and ``attempt``. The coordinator
    builds the record once per round and sends it with every hospital's copy of
    the model.
    """
    return ConfigRecord(
        {
            "job-config": job_json,
            "server-round": server_round,
            "key-epoch": key_epoch,
            "task-fingerprint": task_fingerprint,
            "summary": "",
            SUMMARY_ZLIB: pack_summary(summary),
        }
    )


def pack_summary(summary: str) -> bytes:
    """The job summary as it travels in an instruction (:data:`SUMMARY_ZLIB`)."""
    return zlib.compress(summary.encode(), 6)


def _summary(config: ConfigRecord) -> str:
    """An instruction's job summary: compressed, or as text from an older coordinator."""
    if SUMMARY_ZLIB not in config:
        return _text(config.get("summary", ""), "summary")
    packed = config[SUMMARY_ZLIB]
    if not isinstance(packed, bytes):
        raise MalformedUpdateError(
            f"config field {SUMMARY_ZLIB} must be bytes (got {type(packed).__name__}); {_DISCARD}"
        )
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(packed, MAX_SUMMARY_BYTES)
    except zlib.error as exc:
        raise MalformedUpdateError(
            f"the job summary does not decompress ({exc}); {_DISCARD}"
        ) from exc
    if inflate.unconsumed_tail or not inflate.eof:
        raise MalformedUpdateError(
            f"the job summary is truncated or expands past {MAX_SUMMARY_BYTES} bytes; {_DISCARD}"
        )
    try:
        return text.decode()
    except UnicodeDecodeError as exc:
        raise MalformedUpdateError(f"the job summary is not UTF-8 text; {_DISCARD}") from exc


def _hospital(value: object) -> str:
    name = _text(value, "hospital")
    if not _HOSPITAL.match(name):
        raise MalformedUpdateError(
            f"config field hospital {name[:80]!r} is not a hospital name (1-64 letters, "
            "digits, '.', '_' or '-'); discard the reply"
        )
    return name


def _status(value: object) -> ReplyStatus:
    text = _text(value, "status")
    try:
        return ReplyStatus(text)
    except ValueError:
        choices = ", ".join(s.value for s in ReplyStatus)
        raise MalformedUpdateError(
            f"config field status {text[:80]!r} is unknown (expected one of {choices}); "
            "the sender runs another protocol version, discard the reply"
        ) from None


def _code_text(code: RefusalCode | None) -> str:
    return "" if code is None else code.value


def _code(value: object, status: ReplyStatus) -> RefusalCode | None:
    """The refusal code of a reply with ``status``; none given on a refusal: UNKNOWN."""
    text = _text(value, "code")
    if status is ReplyStatus.OK:
        if text:
            raise MalformedUpdateError(
                f"config field code is {text[:40]!r} on an accepted reply (a refusal code "
                f"belongs to refusals only); {_DISCARD}"
            )
        return None
    if not text:
        return RefusalCode.UNKNOWN  # a hospital running a fedvault without refusal codes
    try:
        return RefusalCode(text)
    except ValueError:
        choices = ", ".join(c.value for c in RefusalCode)
        raise MalformedUpdateError(
            f"config field code {text[:80]!r} is unknown (expected one of {choices}); "
            "the sender runs another protocol version, discard the reply"
        ) from None


def _json_object(value: object, name: str) -> str:
    """Text that is empty or a JSON object (the accountant's state)."""
    text = _text(value, name)
    if text:
        try:
            ok = isinstance(json.loads(text), dict)
        except ValueError:
            ok = False
        if not ok:
            raise MalformedUpdateError(
                f"config field {name} is not a JSON object ({text[:40]!r}…); the sender's "
                "privacy accountant state is corrupt, discard the reply"
            )
    return text


# --- masked rounds: the unmask round trip (coordinator <-> hospital, QUERY) -----


@dataclass(frozen=True)
class UnmaskQuery:
    """Coordinator -> a surviving hospital: the unmask request of a masked round."""

    job: str
    server_round: int
    request: UnmaskRequest

    def to_content(self) -> RecordDict:
        """The query as message content (one config record under :data:`UNMASK_KEY`)."""
        record = ConfigRecord(
            {
                "job": self.job,
                "server-round": self.server_round,
                "request": self.request.to_bytes(),
            }
        )
        return RecordDict({UNMASK_KEY: record})

    @classmethod
    def from_message(cls, msg: Message) -> UnmaskQuery:
        """Parse and validate an unmask query (the hospital's side)."""
        record = msg.content.config_records[UNMASK_KEY]
        job = _text(_get(record, "job", "unmask query"), "job")
        if not _HOSPITAL.match(job):  # job names follow the same rule; it names a directory
            raise MalformedUpdateError(f"unmask query names no valid job ({job[:80]!r})")
        return cls(
            job=job,
            server_round=_int(_get(record, "server-round", "unmask query"), "server-round"),
            request=UnmaskRequest.from_bytes(
                _bytes(_get(record, "request", "unmask query"), "request")
            ),
        )


@dataclass(frozen=True, kw_only=True)
class UnmaskAnswer:
    """A hospital's answer to an :class:`UnmaskQuery`: its reply, or its refusal."""

    hospital: str
    status: ReplyStatus
    reason: str = ""
    reply: UnmaskReply | None = None  # set exactly when OK

    def to_content(self) -> RecordDict:
        """The answer as message content (one config record under :data:`UNMASK_KEY`)."""
        fields: dict[str, ConfigRecordValues] = {
            "hospital": self.hospital,
            "status": self.status.value,
            "reason": self.reason,
        }
        if self.reply is not None:
            fields["reply"] = self.reply.to_bytes()
        return RecordDict({UNMASK_KEY: ConfigRecord(fields)})

    @classmethod
    def from_message(cls, msg: Message) -> UnmaskAnswer:
        """Parse and validate a hospital's unmask answer (the coordinator's side)."""
        what = "unmask answer"
        _check_message(msg, what, MessageType.QUERY, frozenset({UNMASK_KEY}), None)
        if UNMASK_KEY not in msg.content.config_records:
            raise MalformedUpdateError(f"{what} carries no {UNMASK_KEY!r} config record")
        record = msg.content.config_records[UNMASK_KEY]
        status = _status(_get(record, "status", what))
        reply = None
        if status is ReplyStatus.OK:
            reply = UnmaskReply.from_bytes(_bytes(_get(record, "reply", what), "reply"))
        return cls(
            hospital=_hospital(_get(record, "hospital", what)),
            status=status,
            reason=_text(record.get("reason", ""), "reason"),
            reply=reply,
        )
