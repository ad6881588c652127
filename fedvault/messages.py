"""The message contract between the coordinator's ServerApp and a hospital's ClientApp.

Both sides import this leaf module (never each other). It fixes the record
keys and how a model travels inside a Flower :class:`~flwr.app.Message`:

* ``he`` mode: one serialized ``UpdateEnvelope`` (HE ciphertexts + layout)
  carried as a ``uint8`` array, so Flower's own chunking moves large models;
* ``none`` mode: the named float arrays themselves.

Everything that arrives from the other side is parsed defensively: an
oversized reply (checked before anything is decoded), an unexpected message
type or record, a missing key, a wrong type, a non-finite or out-of-range
number raises :class:`MalformedUpdateError` with the offending field named.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedvault.config import JobConfig
from fedvault.privacy.errors import MalformedUpdateError

__all__ = [
    "CEREMONY_KEY",
    "ENVELOPE_KEY",
    "MAX_SAMPLES",
    "SUMMARY_KEY",
    "EvalReply",
    "ModelPayload",
    "ReplyStatus",
    "RoundInstruction",
    "TrainReply",
    "content_nbytes",
    "payload_from_record",
    "payload_to_record",
]

MODEL_KEY = "model"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATUS_KEY = "status"
ENVELOPE_KEY = "he-envelope"
CEREMONY_KEY = "ceremony"  # key-ceremony queries and replies (a ConfigRecord)
SUMMARY_KEY = "job-summary"  # the final report, sent to hospitals when a job ends

#: Largest sample count a reply may claim: the round store keeps counts in
#: 32-bit columns, and no hospital holds two billion records.
MAX_SAMPLES = 2**31 - 1
_MAX_STEPS = 2**63 - 1
# Hospital names as provisioning allows them (fedvault.provision), or "node-<id>".
_HOSPITAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ReplyStatus(StrEnum):
    OK = "ok"
    REFUSED = "refused"  # the hospital declined on purpose (budget, key epoch, data)


@dataclass(frozen=True)
class ModelPayload:
    """A global model or an update: exactly one of ``envelope`` / ``arrays`` is set."""

    envelope: bytes | None = None
    arrays: Mapping[str, np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        if self.envelope is not None:
            return len(self.envelope)
        return sum(int(a.nbytes) for a in (self.arrays or {}).values())


def payload_to_record(payload: ModelPayload) -> ArrayRecord:
    if payload.envelope is not None:
        buf = np.frombuffer(payload.envelope, dtype=np.uint8)
        return ArrayRecord({ENVELOPE_KEY: Array(buf)})
    if payload.arrays is None:
        raise MalformedUpdateError("empty model payload")
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.arrays.items()})


def payload_from_record(record: ArrayRecord) -> ModelPayload:
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
    try:
        return array.numpy()
    except (ValueError, TypeError, EOFError) as exc:  # what numpy's .npy reader raises
        raise MalformedUpdateError(
            f"array {name!r} cannot be decoded ({exc}); it is corrupt, the sender must resend it"
        ) from exc


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

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                MODEL_KEY: payload_to_record(self.model),
                CONFIG_KEY: ConfigRecord(
                    {
                        "job-config": self.job.to_json(),
                        "server-round": self.server_round,
                        "key-epoch": self.key_epoch,
                        "task-fingerprint": self.task_fingerprint,
                        "summary": self.summary,
                    }
                ),
            }
        )

    @classmethod
    def from_message(cls, msg: Message) -> RoundInstruction:
        content = msg.content
        try:
            config = content.config_records[CONFIG_KEY]
            model = content.array_records[MODEL_KEY]
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
            summary=_text(config.get("summary", ""), "summary"),
        )


# --- hospital -> coordinator ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrainReply:
    """A hospital's answer to a train instruction."""

    hospital: str
    status: ReplyStatus
    reason: str = ""
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

    def to_content(self) -> RecordDict:
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            STATUS_KEY: ConfigRecord(
                {
                    "hospital": self.hospital,
                    "status": self.status.value,
                    "reason": self.reason,
                    "accountant": self.accountant,
                    "accountant-state": self.accountant_state,
                    "evaluation": self.evaluation,
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
            status = content.config_records[STATUS_KEY]
            metrics = content.metric_records[METRICS_KEY]
            hospital = _hospital(status["hospital"])
            state = _status(status["status"])
            reply = cls(
                hospital=hospital,
                status=state,
                reason=_text(status.get("reason", ""), "reason"),
                update=(
                    payload_from_record(content.array_records[MODEL_KEY])
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
    hospital: str
    status: ReplyStatus
    reason: str = ""
    accuracy: float = 0.0
    loss: float = 0.0
    samples: int = 0
    evaluation: str = ""  # as TrainReply.evaluation

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                STATUS_KEY: ConfigRecord(
                    {
                        "hospital": self.hospital,
                        "status": self.status.value,
                        "reason": self.reason,
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
        keys = frozenset({STATUS_KEY, METRICS_KEY})
        _check_message(msg, "evaluation reply", MessageType.EVALUATE, keys, max_bytes)
        content = msg.content
        try:
            status = content.config_records[STATUS_KEY]
            metrics = content.metric_records[METRICS_KEY]
            reply = cls(
                hospital=_hospital(status["hospital"]),
                status=_status(status["status"]),
                reason=_text(status.get("reason", ""), "reason"),
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
