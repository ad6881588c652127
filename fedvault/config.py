"""Typed job configuration, read once and shared by both sides.

A leaf module: it imports neither ``fedvault.coordinator`` nor ``fedvault.client``.
The same :class:`JobConfig` travels three ways — from the CLI, as Flower run
config (flat ``key=value`` pairs), and as JSON inside every round message and in
the round store — and is validated the same way each time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any, Literal, Protocol, cast, get_args

from fedvault.errors import InvalidConfigError
from fedvault.json_types import JSONObject
from fedvault.partition import Partition
from fedvault.privacy.dp import AccountantName, PrivacyConfig

__all__ = [
    "DEFAULT_MAX_UPDATE_BYTES",
    "JobConfig",
    "OptimizerName",
    "SecureAggregation",
    "TrainingConfig",
]

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Default cap on one hospital reply: a 256 MiB envelope holds a model of tens
#: of millions of parameters even at a public-key ciphertext's ~4x expansion.
DEFAULT_MAX_UPDATE_BYTES = 256 * 2**20
_MIN_UPDATE_BYTES = 1024
#: The local update rules a job may name (``TrainingConfig.optimizer``).
OptimizerName = Literal["sgd", "adam"]


class SecureAggregation(StrEnum):
    """How hospital updates are combined.

    ``he``: BFV ciphertexts summed by a coordinator that holds no secret key.
    ``none``: plaintext FedAvg, for research baselines only.
    """

    HE = "he"
    NONE = "none"

    @property
    def encrypted(self) -> bool:
        """Whether updates and models travel encrypted: the one he/none test.

        Code that depends on the mode reads this (or, on the coordinator,
        :func:`fedvault.coordinator.aggregation.aggregation_mode`), never the
        mode's name.
        """
        return self is SecureAggregation.HE

    @classmethod
    def parse(cls, text: str) -> SecureAggregation:
        """The mode named ``text``; :class:`InvalidConfigError` lists the choices."""
        try:
            return cls(text)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InvalidConfigError(
                f"unknown secure aggregation mode {text!r}: choose one of {choices}"
            ) from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Local optimisation at each hospital (per round)."""

    batch_size: int
    learning_rate: float
    local_epochs: int = 1
    momentum: float = 0.0
    #: ``"sgd"`` (with ``momentum``) or ``"adam"``: the update rule applied to
    #: the clipped, noised gradient (post-processing: ε does not depend on it).
    optimizer: OptimizerName = "sgd"

    def __post_init__(self) -> None:
        _require(
            _is_int(self.batch_size) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1 (got {self.batch_size!r})",
        )
        _require(
            _is_finite_number(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate must be > 0 (got {self.learning_rate!r})",
        )
        _require(
            _is_int(self.local_epochs) and self.local_epochs >= 1,
            f"local_epochs must be an integer >= 1 (got {self.local_epochs!r})",
        )
        _require(
            _is_finite_number(self.momentum) and 0 <= self.momentum < 1,
            f"momentum must be in [0, 1) (got {self.momentum!r})",
        )
        _require(
            self.optimizer in get_args(OptimizerName),
            f"optimizer must be one of {list(get_args(OptimizerName))} (got {self.optimizer!r})",
        )
        _require(
            self.optimizer == "sgd" or self.momentum == 0,
            "momentum applies to optimizer 'sgd' only (Adam keeps its own moment estimates); "
            "set momentum = 0",
        )


class _TaskLike(Protocol):
    """What :meth:`JobConfig.for_task` reads of a task.

    A :class:`~fedvault.task.Task`, or the torch-free
    :class:`~fedvault.task_registry.TaskDescription`.
    """

    @property
    def name(self) -> str: ...

    @property
    def defaults(self) -> Any: ...

    @property
    def best_metric(self) -> str: ...


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything that defines a federated job; identical at every party.

    A job is identified by ``job`` (its name), not by Flower's run id, so a
    restarted coordinator finds it in the store and resumes it.
    """

    job: str
    # How the job names its task: an entry-point name of the ``fedvault.tasks``
    # group (the built-in examples) or ``module:attribute``. Each party resolves
    # it in its own environment; the task fingerprint proves they agree.
    task: str
    hospitals: int
    rounds: int
    privacy: PrivacyConfig
    training: TrainingConfig
    partition: Partition = Partition(kind="iid")  # noqa: RUF009 - frozen, immutable
    secure_aggregation: SecureAggregation = SecureAggregation.HE
    seed: int = 0
    min_hospitals: int = 0  # 0 means "all hospitals"
    round_timeout_s: float = 600.0
    # Replies larger than this are refused before they are parsed (a hostile
    # or broken hospital must not make the coordinator parse gigabytes).
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES
    # A round with fewer than `quorum` good replies is recorded as failed and
    # tried again with the same model, at most this many times in all.
    max_round_attempts: int = 3
    # The validation metric `fedvault model export --round best` picks by.
    best_metric: str = "loss"
    # he mode: hospitals mask their updates inside the encryption (SecAgg+,
    # docs/secagg.md), so no single hospital colluding with the coordinator can
    # decrypt another's update. Ignored in `none` mode. Job files without it: on.
    masking: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.job, str) and bool(_JOB_NAME.match(self.job)),
            f"job name {self.job!r} is invalid: use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit",
        )
        _require(
            isinstance(self.task, str) and bool(self.task.strip()),
            "task must be a non-empty name or module:attribute",
        )
        _require(
            isinstance(self.best_metric, str) and bool(re.fullmatch(r"\w{1,64}", self.best_metric)),
            "best_metric must be a metric name such as 'auroc' or 'rmse' "
            f"(got {self.best_metric!r})",
        )
        _require(
            _is_int(self.hospitals) and self.hospitals >= 1,
            f"hospitals must be an integer >= 1 (got {self.hospitals!r})",
        )
        _require(
            _is_int(self.rounds) and self.rounds >= 1,
            f"rounds must be an integer >= 1 (got {self.rounds!r})",
        )
        _require(
            _is_int(self.seed) and self.seed >= 0,
            f"seed must be an integer >= 0 (got {self.seed!r})",
        )
        _require(
            _is_int(self.min_hospitals) and 0 <= self.min_hospitals <= self.hospitals,
            f"min_hospitals must be between 1 and hospitals={self.hospitals} "
            f"(got {self.min_hospitals!r}; 0 means all)",
        )
        _require(
            _is_finite_number(self.round_timeout_s) and self.round_timeout_s > 0,
            f"round_timeout_s must be > 0 (got {self.round_timeout_s!r})",
        )
        _require(
            _is_int(self.max_update_bytes) and self.max_update_bytes >= _MIN_UPDATE_BYTES,
            f"max_update_bytes must be an integer >= {_MIN_UPDATE_BYTES} "
            f"(got {self.max_update_bytes!r}); the default is {DEFAULT_MAX_UPDATE_BYTES}",
        )
        _require(
            _is_int(self.max_round_attempts) and self.max_round_attempts >= 1,
            f"max_round_attempts must be an integer >= 1 (got {self.max_round_attempts!r})",
        )
        _require(
            isinstance(self.masking, bool),
            f"masking must be true or false (got {self.masking!r})",
        )
        _require(
            self.training.batch_size >= 1,
            "batch_size must be >= 1",
        )

    @property
    def masked(self) -> bool:
        """Whether this job's rounds mask updates (``he`` mode with ``masking``)."""
        return self.masking and self.secure_aggregation is SecureAggregation.HE

    @property
    def quorum(self) -> int:
        """Replies a round needs to commit."""
        return self.min_hospitals or self.hospitals

    @classmethod
    def for_task(
        cls,
        task: _TaskLike,
        *,
        hospitals: int,
        rounds: int,
        epsilon: float = 3.0,
        delta: float = 1e-5,
        partition: str | Partition = "iid",
        secure_aggregation: str | SecureAggregation = "he",
        seed: int = 0,
        job: str | None = None,
        reference: str | None = None,
        masking: bool = True,
        **overrides: float | str,
    ) -> JobConfig:
        """A job on ``task`` with its tuned training defaults.

        ``reference`` is how parties find the task (default: its name, which
        is its entry-point name for installed tasks). ``overrides`` may set any
        :class:`TrainingConfig` field, ``max_grad_norm``, ``accountant``
        (``"prv"``, the default, or ``"rdp"``), ``min_hospitals``,
        ``round_timeout_s``, ``max_update_bytes``, ``max_round_attempts`` or
        ``best_metric`` (default: the task's).
        """
        d = task.defaults
        training = {
            "batch_size": d.batch_size,
            "learning_rate": d.learning_rate,
            "local_epochs": d.local_epochs,
            "momentum": d.momentum,
            "optimizer": d.optimizer,
        }
        top: dict[str, Any] = {"best_metric": task.best_metric}
        max_grad_norm = d.max_grad_norm
        accountant: AccountantName = "prv"
        for key, value in overrides.items():
            if key in training:
                training[key] = value
            elif key == "max_grad_norm":
                max_grad_norm = value
            elif key == "accountant":
                accountant = cast(AccountantName, value)  # PrivacyConfig validates it
            elif key in (
                "min_hospitals",
                "round_timeout_s",
                "max_update_bytes",
                "max_round_attempts",
                "best_metric",
            ):
                top[key] = value
            else:
                raise InvalidConfigError(f"unknown job setting {key!r}")
        parts = partition if isinstance(partition, Partition) else Partition.parse(partition)
        mode = (
            secure_aggregation
            if isinstance(secure_aggregation, SecureAggregation)
            else SecureAggregation.parse(secure_aggregation)
        )
        return cls(
            job=job or f"{task.name}-{hospitals}h-{rounds}r-seed{seed}",
            task=reference or task.name,
            hospitals=hospitals,
            rounds=rounds,
            privacy=PrivacyConfig(
                epsilon=epsilon, delta=delta, max_grad_norm=max_grad_norm, accountant=accountant
            ),
            training=TrainingConfig(**training),
            partition=parts,
            secure_aggregation=mode,
            seed=seed,
            masking=masking,
            **top,
        )

    # --- serialisation -------------------------------------------------------

    def to_dict(self) -> JSONObject:
        """JSON-safe, nested form (stored with the job, sent with each round)."""
        out = asdict(self)
        out["partition"] = str(self.partition)
        out["secure_aggregation"] = self.secure_aggregation.value
        if self.masking:  # the default: jobs stored before masking existed resume unchanged
            del out["masking"]
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> JobConfig:
        """Parse and validate; :class:`InvalidConfigError` names what is wrong."""
        try:
            # Any: the values are checked by the constructors below (TypeError, ValueError).
            fields: dict[str, Any] = dict(data)
            if "example" in fields and "task" not in fields:  # jobs stored before tasks
                fields["task"] = fields.pop("example")
            privacy = PrivacyConfig(**dict(fields.pop("privacy")))
            training = TrainingConfig(**dict(fields.pop("training")))
            partition = Partition.parse(str(fields.pop("partition", "iid")))
            mode = SecureAggregation.parse(str(fields.pop("secure_aggregation", "he")))
            return cls(
                privacy=privacy,
                training=training,
                partition=partition,
                secure_aggregation=mode,
                **fields,
            )
        except InvalidConfigError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(
                f"malformed job configuration ({exc}); regenerate it with "
                "`fedvault simulate` or the consortium's job file"
            ) from exc

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        """Parse and validate JSON (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InvalidConfigError(f"job configuration is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidConfigError("job configuration must be a JSON object")
        return cls.from_dict(data)

    def with_job(self, job: str) -> JobConfig:
        """A copy with the job named ``job``."""
        return replace(self, job=job)

    #: Earlier name of :meth:`for_task`.
    for_example = for_task
