"""The message contract between the coordinator's ServerApp and a hospital's ClientApp.

Both sides import this leaf module (never each other). It fixes the record
keys and how a model travels inside a Flower :class:`~flwr.app.Message`:

* ``he`` mode: one serialized ``UpdateEnvelope`` (HE ciphertexts + layout)
  carried as a ``uint8`` array, so Flower's own chunking moves large models;
* ``none`` mode: the named float arrays themselves.

Everything that arrives from the other side is parsed defensively: a missing
key, a wrong type or a non-finite number raises :class:`MalformedUpdateError`
with the offending field named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedvault.config import JobConfig
from fedvault.privacy.errors import MalformedUpdateError

__all__ = [
    "CEREMONY_KEY",
    "ENVELOPE_KEY",
    "EvalReply",
    "ModelPayload",
    "ReplyStatus",
    "RoundInstruction",
    "TrainReply",
    "payload_from_record",
    "payload_to_record",
]

MODEL_KEY = "model"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
STATUS_KEY = "status"
ENVELOPE_KEY = "he-envelope"
CEREMONY_KEY = "ceremony"  # key-ceremony queries and replies (a ConfigRecord)


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
            raise MalformedUpdateError("encrypted payload carries extra plaintext arrays")
        data = record[ENVELOPE_KEY].numpy()
        if data.dtype != np.uint8 or data.ndim != 1:
            raise MalformedUpdateError("encrypted payload is not a byte string")
        return ModelPayload(envelope=data.tobytes())
    if len(record) == 0:
        raise MalformedUpdateError("model payload holds no arrays")
    return ModelPayload(arrays={k: v.numpy() for k, v in record.items()})


# --- coordinator -> hospital ---------------------------------------------------


@dataclass(frozen=True)
class RoundInstruction:
    """What the coordinator asks of a hospital for one round."""

    job: JobConfig
    server_round: int
    key_epoch: int
    model: ModelPayload

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                MODEL_KEY: payload_to_record(self.model),
                CONFIG_KEY: ConfigRecord(
                    {
                        "job-config": self.job.to_json(),
                        "server-round": self.server_round,
                        "key-epoch": self.key_epoch,
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

    def to_content(self) -> RecordDict:
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            STATUS_KEY: ConfigRecord(
                {
                    "hospital": self.hospital,
                    "status": self.status.value,
                    "reason": self.reason,
                    "accountant": self.accountant,
                    "accountant-state": self.accountant_state,
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
    def from_message(cls, msg: Message) -> TrainReply:
        content = msg.content
        try:
            status = content.config_records[STATUS_KEY]
            metrics = content.metric_records[METRICS_KEY]
            hospital = str(status["hospital"])
            state = ReplyStatus(str(status["status"]))
            reply = cls(
                hospital=hospital,
                status=state,
                reason=str(status.get("reason", "")),
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
                accountant=str(status.get("accountant", "")),
                accountant_state=str(status.get("accountant-state", "")),
                eval_accuracy=_finite(metrics.get("eval-accuracy", 0.0), "eval-accuracy"),
                eval_loss=_finite(metrics.get("eval-loss", 0.0), "eval-loss"),
                eval_samples=_int(metrics.get("eval-num-examples", 0), "eval-num-examples"),
            )
        except KeyError as exc:
            raise MalformedUpdateError(f"train reply lacks {exc}") from exc
        except ValueError as exc:
            if isinstance(exc, MalformedUpdateError):
                raise
            raise MalformedUpdateError(f"train reply is malformed: {exc}") from exc
        if not 0.0 <= reply.eval_accuracy <= 1.0:
            raise MalformedUpdateError(
                f"eval-accuracy must be in [0, 1] (got {reply.eval_accuracy})"
            )
        if state is ReplyStatus.OK and reply.samples <= 0:
            raise MalformedUpdateError(
                f"{hospital}: sample count must be > 0 (got {reply.samples})"
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

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                STATUS_KEY: ConfigRecord(
                    {"hospital": self.hospital, "status": self.status.value, "reason": self.reason}
                ),
                METRICS_KEY: MetricRecord(
                    {"accuracy": self.accuracy, "loss": self.loss, "num-examples": self.samples}
                ),
            }
        )

    @classmethod
    def from_message(cls, msg: Message) -> EvalReply:
        content = msg.content
        try:
            status = content.config_records[STATUS_KEY]
            metrics = content.metric_records[METRICS_KEY]
            reply = cls(
                hospital=str(status["hospital"]),
                status=ReplyStatus(str(status["status"])),
                reason=str(status.get("reason", "")),
                accuracy=_finite(metrics["accuracy"], "accuracy"),
                loss=_finite(metrics["loss"], "loss"),
                samples=_int(metrics["num-examples"], "num-examples"),
            )
        except KeyError as exc:
            raise MalformedUpdateError(f"evaluation reply lacks {exc}") from exc
        except ValueError as exc:
            if isinstance(exc, MalformedUpdateError):
                raise
            raise MalformedUpdateError(f"evaluation reply is malformed: {exc}") from exc
        if not 0.0 <= reply.accuracy <= 1.0:
            raise MalformedUpdateError(f"accuracy must be in [0, 1] (got {reply.accuracy})")
        return reply


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedUpdateError(f"{name} must be a number (got {type(value).__name__})")
    if not math.isfinite(value):
        raise MalformedUpdateError(f"{name} must be finite (got {value})")
    return float(value)


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedUpdateError(f"{name} must be an integer (got {value!r})")
    if value < 0:
        raise MalformedUpdateError(f"{name} must be >= 0 (got {value})")
    return value
