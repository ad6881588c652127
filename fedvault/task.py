"""What a consortium trains: a :class:`Task`.

One task object serves every path: ``fedvault simulate`` (virtual hospitals on
a reference data set), the hospital agent (the hospital's own declared data)
and the coordinator (the initial model's architecture). A job names its task
as an installed entry point (group ``fedvault.tasks``; the built-in examples
are registered that way) or as ``module:attribute``; see
:mod:`fedvault.task_registry`.

This module imports torch for type hints only, so a task's *description*
(name, kind, defaults) can be read by processes that never train.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from fedvault.errors import InvalidConfigError

if TYPE_CHECKING:  # torch loads with a task's model and data, not with its description
    from torch import Tensor, nn
    from torch.utils.data import Dataset

__all__ = ["METRIC_DEFAULTS", "Task", "TaskKind", "TrainingDefaults", "dataset_targets"]

#: ``binary``: two logits, the second is the positive class (label 1);
#: ``multiclass``: one logit per class; ``regression``: one real output.
TaskKind = Literal["binary", "multiclass", "regression"]

#: The validation metric ``--round best`` uses when neither the job nor the task names one.
METRIC_DEFAULTS: Mapping[str, str] = {
    "binary": "auroc",
    "multiclass": "balanced_accuracy",
    "regression": "rmse",
}

#: A task's own metric: ``(targets, scores) -> value`` on one hospital's held-out
#: data. ``scores`` are class probabilities ``(n, classes)`` for classification
#: and predictions ``(n,)`` for regression.
MetricFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True, kw_only=True)
class TrainingDefaults:
    """Local DP-SGD hyper-parameters that suit a task.

    Tuned by experiment for the target budget (ε = 3, δ = 1e-5 over the whole
    job): DP-SGD wants fewer, larger, clipped steps than plain SGD, so values
    that are good without privacy are usually bad with it.

    Parameters
    ----------
    batch_size
        Expected Poisson batch size; the sample rate is ``batch_size / n``.
    learning_rate
        SGD step size.
    local_epochs
        Passes over the local data per round.
    max_grad_norm
        Per-sample clipping bound C of DP-SGD (Abadi et al., 2016).
    momentum
        SGD momentum.
    optimizer
        ``"sgd"`` or ``"adam"``: the update rule applied to the clipped,
        noised gradient. Adam rescales each coordinate by its own running
        noise-dominated magnitude, so the weights a small gradient reaches
        (LoRA adapters beside a classification head) still move; the
        privacy guarantee is the same (post-processing).
    """

    batch_size: int
    learning_rate: float
    local_epochs: int = 1
    max_grad_norm: float = 1.0
    momentum: float = 0.0
    optimizer: Literal["sgd", "adam"] = "sgd"


# eq=False: a task is compared (and hashed) by identity, like the module that defines it.
@dataclass(frozen=True, kw_only=True, eq=False)
class Task:
    """A federated task: model, loss, metrics, data and training defaults.

    Parameters
    ----------
    name
        The task's name: what a site policy allows and what reports show.
    kind
        ``"binary"``, ``"multiclass"`` or ``"regression"``; picks the default
        loss (cross-entropy or mean squared error) and the metrics
        (:mod:`fedvault.metrics`).
    build_model
        Returns a fresh, untrained model. It must be Opacus-compatible: no
        BatchNorm (it mixes samples, which breaks per-sample clipping); use
        GroupNorm or no normalisation. Classification models return
        ``(batch, num_outputs)`` logits, regression models ``(batch, 1)`` or
        ``(batch,)``.
    num_outputs
        Logits of a classification model (2 for ``binary``); 1 for regression.
    defaults
        Training hyper-parameters tuned for this task.
    load_data
        ``seed -> (train, test)``: a reference data set for ``fedvault
        simulate``, split among virtual hospitals. Items are ``(features,
        target)`` pairs. ``None``: the task cannot be simulated.
    site_data
        ``DataSpec -> (train, test)``: how a hospital's declared data (see
        ``examples/hospital-data/README.md``) becomes data sets. ``None``: the
        generic reader (CSV, Parquet or an entry point; targets are class
        indices, or real numbers for regression). Override it to reshape
        features (images stored as rows, say).
    loss
        ``(outputs, targets) -> mean loss``; ``None``: cross-entropy for
        classification, mean squared error for regression.
    metrics
        The task's own metrics, ``name -> (targets, scores) -> float``, computed
        at each hospital and summarised across hospitals as a sample-weighted
        mean (say so when you publish them).
    validation_metric
        The metric ``--round best`` picks by, unless the job names another;
        ``""``: :data:`METRIC_DEFAULTS` for the kind.
    shared
        What travels and is aggregated: ``"all"`` (every tensor of the state
        dict) or ``"trainable"`` (only parameters that require gradients:
        adapters and a head on a frozen pretrained model). The frozen rest
        never leaves a party: each rebuilds it with ``build_model``, and the
        task fingerprint carries a hash of its values, so every party must load
        the same pretrained weights.
    description
        One line for listings.
    """

    name: str
    kind: TaskKind
    build_model: Callable[[], nn.Module]
    num_outputs: int
    defaults: TrainingDefaults
    load_data: Callable[[int], tuple[Dataset[Any], Dataset[Any]]] | None = None
    site_data: Callable[[Any], tuple[Dataset[Any], Dataset[Any]]] | None = None
    loss: Callable[[Tensor, Tensor], Tensor] | None = None
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)
    validation_metric: str = ""
    shared: Literal["all", "trainable"] = "all"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidConfigError("a task needs a non-empty name")
        if self.kind not in get_args(TaskKind):
            raise InvalidConfigError(
                f"task {self.name!r}: kind {self.kind!r} is not one of {get_args(TaskKind)}"
            )
        if not callable(self.build_model):
            raise InvalidConfigError(f"task {self.name!r}: build_model must be callable")
        want = {"binary": "2", "regression": "1"}.get(self.kind)
        ok = (
            isinstance(self.num_outputs, int)
            and not isinstance(self.num_outputs, bool)
            and (str(self.num_outputs) == want if want else self.num_outputs >= 2)
        )
        if not ok:
            raise InvalidConfigError(
                f"task {self.name!r}: a {self.kind} task needs num_outputs = "
                f"{want or 'the number of classes (>= 2)'} (got {self.num_outputs!r})"
            )
        if not isinstance(self.defaults, TrainingDefaults):
            raise InvalidConfigError(f"task {self.name!r}: defaults must be a TrainingDefaults")
        if self.shared not in ("all", "trainable"):
            raise InvalidConfigError(
                f"task {self.name!r}: shared must be 'all' or 'trainable' (got {self.shared!r})"
            )

    @property
    def is_classification(self) -> bool:
        """Whether the task classifies (binary or multiclass), rather than regresses."""
        return self.kind != "regression"

    @property
    def num_classes(self) -> int:
        """Classes of a classification task; 0 for regression."""
        return self.num_outputs if self.is_classification else 0

    @property
    def best_metric(self) -> str:
        """The metric ``--round best`` uses by default."""
        return self.validation_metric or METRIC_DEFAULTS[self.kind]

    def shared_names(self, model: nn.Module) -> list[str]:
        """State-dict names of the tensors that travel, in state-dict order."""
        names = list(model.state_dict())
        if self.shared == "all":
            return names
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise InvalidConfigError(
                f"task {self.name!r} shares only trainable parameters, but its model has "
                "none (every parameter has requires_grad=False)"
            )
        return [name for name in names if name in trainable]

    def criterion(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The training loss, mean over a batch (what DP-SGD clips per sample)."""
        if self.loss is not None:
            return self.loss
        from torch import nn

        if self.is_classification:
            return nn.CrossEntropyLoss()
        return _regression_loss()

    def scores(self, outputs: Tensor) -> Tensor:
        """What metrics read from model outputs: class probabilities, or predictions."""
        if self.is_classification:
            return outputs.softmax(dim=1)
        return outputs.reshape(len(outputs), -1)[:, 0]

    def targets(self, dataset: Dataset[Any]) -> np.ndarray:
        """Every target of ``dataset`` (labels as ``int64``, regression values as ``float64``)."""
        return dataset_targets(dataset, regression=not self.is_classification)


def dataset_targets(dataset: Dataset[Any], *, regression: bool = False) -> np.ndarray:
    """The targets of ``dataset`` without loading every sample where it can.

    Reads the last tensor of a ``TensorDataset`` (or a ``targets`` attribute);
    any other data set is iterated once, taking the second element of each item.
    """
    from torch.utils.data import Subset, TensorDataset

    dtype = np.float64 if regression else np.int64
    if isinstance(dataset, TensorDataset):
        return _as_array(dataset.tensors[-1], dtype)
    if isinstance(dataset, Subset):
        inner = dataset_targets(dataset.dataset, regression=regression)
        return inner[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _as_array(targets, dtype)
    n = len(dataset)  # type: ignore[arg-type]
    return np.array([float(dataset[i][1]) for i in range(n)]).astype(dtype)


def _as_array(values: Any, dtype: type) -> np.ndarray:
    from torch import Tensor

    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1).astype(dtype)


def _regression_loss() -> Callable[[Tensor, Tensor], Tensor]:
    """Mean squared error as a ``torch.nn`` loss.

    Of ``(batch, 1)`` or ``(batch,)`` predictions against ``(batch,)`` targets.
    Opacus' ghost clipping needs a ``torch.nn`` loss (it switches the reduction to
    per-sample).
    """
    from torch import nn

    class RegressionMSE(nn.MSELoss):
        def forward(self, input: Tensor, target: Tensor) -> Tensor:
            return super().forward(input.reshape(target.shape), target)

    return RegressionMSE()
