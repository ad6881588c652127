"""Local training and evaluation at a hospital.

Training is always DP-SGD (Opacus, Poisson sampling, per-sample clipping): the
model that leaves the hospital — even encrypted — is already differentially
private with respect to each patient record, so the privacy guarantee does not
rest on the encryption alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedvault.config import TrainingConfig
from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.privacy.dp import (
    AccountantState,
    DpPlan,
    GradSampleMode,
    PrivateTraining,
    make_private,
)
from fedvault.task import Task

if TYPE_CHECKING:
    from fedvault.metrics import EvalResult

__all__ = [
    "LocalResult",
    "evaluate",
    "get_weights",
    "make_optimizer",
    "pick_device",
    "set_weights",
    "train_private",
]


@dataclass(frozen=True)
class LocalResult:
    """What one round of local DP-SGD produced."""

    loss: float
    state: AccountantState  # accountant history after this round (all rounds of the job)
    round_steps: int


def pick_device(preference: str = "auto") -> torch.device:
    """The device a hospital trains on.

    ``"auto"`` (its GPU when it has one, else the CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``.

    Raises
    ------
    InvalidConfigError
        For an unknown name, or a GPU this machine does not have (naming what it has).
    """
    from fedvault.errors import InvalidConfigError

    text = str(preference).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise InvalidConfigError(f"device {preference!r} is not one of auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= count:
        have = f"{count} GPU(s)" if count else "no usable GPU (or a CPU-only torch)"
        raise InvalidConfigError(
            f"device {preference!r} was asked for but this machine has {have}; "
            "use --device cpu or auto, or install the CUDA build of torch"
        )
    return torch.device(text)


def get_weights(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The model's state as named numpy arrays (the order is the state dict's).

    ``names``: only those (the tensors a task shares, see ``Task.shared_names``).
    """
    state = model.state_dict()
    keep = state.keys() if names is None else names
    return {k: state[k].detach().cpu().numpy().copy() for k in keep}


def set_weights(
    model: nn.Module, arrays: Mapping[str, np.ndarray], names: Sequence[str] | None = None
) -> None:
    """Load named arrays, refusing any mismatch in names or shapes.

    ``names``: the tensors ``arrays`` must hold exactly (a task that shares only
    its trainable parameters); the model keeps its own values of the rest.
    """
    full = model.state_dict()
    expected = full if names is None else {k: full[k] for k in names}
    if set(arrays) != set(expected):
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        raise MalformedUpdateError(
            f"global model does not fit the local model (missing {missing}, unexpected {extra}); "
            "coordinator and hospital must run the same model definition"
        )
    state = {}
    for name, ref in expected.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(ref.shape):
            raise MalformedUpdateError(
                f"global model tensor {name!r} has shape {value.shape}, expected {tuple(ref.shape)}"
            )
        state[name] = torch.as_tensor(value, dtype=ref.dtype)
    model.load_state_dict(state, strict=names is None)


def train_private(
    model: nn.Module,
    data: Dataset,
    *,
    task: Task,
    training: TrainingConfig,
    max_grad_norm: float,
    batch_size: int,
    plan: DpPlan,
    state: AccountantState,
    device: torch.device,
    seed: int,
    max_physical_batch_size: int | None = None,
    grad_sample_mode: GradSampleMode = "auto",
    mixed_precision: bool = False,
    secure_rng: bool = True,
) -> LocalResult:
    """Run one round of local DP-SGD, continuing the job's accountant ``state``.

    Per-sample clipping is by ghost clipping or ExpandedWeights where the
    model and the task's loss allow it, else by hooks (``grad_sample_mode``,
    see :func:`fedvault.privacy.dp.make_private`): the same step either way.

    ``max_physical_batch_size`` caps the batch this hospital's memory holds at
    once: every Poisson (logical) batch larger than the cap is split into
    physical batches of at most that size by Opacus' ``BatchMemoryManager``;
    their clipped gradients are summed and the optimizer steps (and the
    accountant counts a step) once per logical batch, so the noise, the step
    count and epsilon are those of the uncapped run. ``None``: no cap.

    ``mixed_precision``: run the forward pass under bfloat16 autocast on a
    CUDA device with bfloat16 support (as Opacus supports; the loss, the
    clipped sum and the noise stay float32); ignored elsewhere, on CPU in
    particular. Off by default: per-sample norms and, in ghost mode, the
    batch's summed gradient are then rounded to bfloat16 (~3 significant
    digits), which the exact-arithmetic DP-SGD analysis does not cover.

    ``secure_rng``: draw the noise and the Poisson batches from a CSPRNG
    (on, as a deployed hospital trains; see
    :func:`fedvault.privacy.dp.make_private`); off, from torch's generator
    seeded by ``seed``: reproducible, for simulations and tests.

    Raises
    ------
    InvalidConfigError
        For a ``max_physical_batch_size`` that is not an integer >= 1, or a
        model or mode :func:`~fedvault.privacy.dp.make_private` refuses.
    """
    _check_physical_cap(max_physical_batch_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(model, training)
    private = make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        state=state,
        grad_sample_mode=grad_sample_mode,
        criterion=task.criterion(),
        secure_rng=secure_rng,
        autocast=_autocasts(device, enabled=mixed_precision),
    )
    with _physical_batches(private, max_physical_batch_size) as batches:
        total_loss, total_seen = _local_epochs(
            private, batches, training.local_epochs, device, mixed_precision
        )
    model.to("cpu")
    after = private.state()
    return LocalResult(
        loss=total_loss / max(total_seen, 1),
        state=after,
        round_steps=after.steps - state.steps,  # optimizer steps = logical batches
    )


def _local_epochs(
    private: PrivateTraining,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    device: torch.device,
    mixed_precision: bool,
) -> tuple[float, int]:
    """Run ``epochs`` passes of DP-SGD steps over ``batches``.

    Returns the summed loss (weighted by batch size) and the number of samples seen.
    """
    criterion = private.criterion
    assert criterion is not None  # make_private returns the criterion it was given
    total_loss, total_seen = 0.0, 0
    for _ in range(epochs):
        for features, labels in batches:
            features, labels = features.to(device), labels.to(device)
            private.optimizer.zero_grad(set_to_none=True)
            if not len(labels) and private.grad_sample_mode == "ew":
                # ExpandedWeights refuses a batch of size 0: Opacus' optimizer
                # takes the same noise-only step from empty per-sample gradients.
                private.noise_only_step()
                continue
            logits = _forward(private, features, device, mixed_precision)
            if mixed_precision and logits.is_floating_point():
                logits = logits.float()  # the loss in float32, as Opacus' AMP support does
            # Poisson sampling can draw an empty batch; Opacus still takes the
            # (noise-only) step so the accountant's step count stays exact. The
            # zero must depend on the parameters (it gives each a zero gradient),
            # in ghost mode too: the wrapped loss of no sample is NaN.
            loss = criterion(logits, labels) if len(labels) else logits.sum() * 0.0
            loss.backward()
            # With a physical-batch cap this step only accumulates the clipped
            # gradients until the logical batch's last physical batch.
            private.optimizer.step()
            if len(labels):
                total_loss += float(loss.detach()) * len(labels)
                total_seen += len(labels)
    return total_loss, total_seen


def make_optimizer(model: nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    """The job's local optimizer over ``model``'s trainable parameters.

    Created afresh each round: its state (momentum, Adam's moments) does not
    outlive the round, as in FedAvg, so no hospital carries state the
    aggregate did not see.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.learning_rate)
    return torch.optim.SGD(params, lr=training.learning_rate, momentum=training.momentum)


def _forward(
    private: PrivateTraining, features: torch.Tensor, device: torch.device, mixed: bool
) -> torch.Tensor:
    try:
        with _autocast(device, enabled=mixed):
            return private.module(features)
    except NotImplementedError as exc:
        if private.grad_sample_mode != "ghost":
            raise
        # A layer called twice per forward pass: invisible in the model's
        # structure, refused by ghost clipping on the first batch.
        raise InvalidConfigError(
            f"ghost clipping cannot train this model ({exc}); "
            "train it with grad_sample_mode='hooks'"
        ) from exc


def _check_physical_cap(cap: object) -> None:
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise InvalidConfigError(
            f"max_physical_batch_size must be an integer >= 1 or None (got {cap!r}); "
            "it is the most samples this hospital backpropagates at once, e.g. 64"
        )


@contextmanager
def _physical_batches(
    private: PrivateTraining, cap: int | None
) -> Iterator[Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """The private data loader, its Poisson batches split to at most ``cap`` samples.

    Split whenever a cap is set (not only when the *expected* batch exceeds
    it): Poisson batches vary, and one above the cap would not fit either.
    Splitting changes no step: Opacus' optimizer sums the physical batches'
    clipped gradients and steps once per logical batch; an empty logical batch
    stays one (empty) physical batch that takes its noise-only step.
    """
    if cap is None:
        yield private.data_loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(
        data_loader=private.data_loader,
        max_physical_batch_size=cap,
        optimizer=private.optimizer,
    ) as loader:
        yield loader


def _autocasts(device: torch.device, *, enabled: bool) -> bool:
    """Whether :func:`_autocast` autocasts: asked for, on CUDA with bfloat16 support."""
    return (
        enabled
        and torch.device(device).type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported()
    )


def _autocast(device: torch.device, *, enabled: bool) -> AbstractContextManager[object]:
    """bfloat16 autocast for the forward pass on CUDA (when asked and supported); else a no-op.

    bfloat16, not float16: float16 needs loss scaling, and a scaled loss scales
    every per-sample gradient before it is clipped.
    """
    if _autocasts(device, enabled=enabled):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, task: Task, device: torch.device) -> EvalResult:
    """The task's loss and metrics of ``model`` on ``data`` (see :mod:`fedvault.metrics`).

    Also returns the sufficient statistics (confusion counts, score histograms,
    error sums) the coordinator pools into consortium-wide metrics.

    Raises
    ------
    DataError
        If ``data`` is empty: there is nothing to evaluate.
    """
    from fedvault.errors import DataError
    from fedvault.metrics import evaluate_scores

    model.to(device).eval()
    criterion = task.criterion()
    loss, seen = 0.0, 0
    targets: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for features, labels in DataLoader(data, batch_size=1024):
        features, labels = features.to(device), labels.to(device)
        outputs = model(features)
        loss += float(criterion(outputs, labels)) * len(labels)
        seen += len(labels)
        targets.append(labels.cpu().numpy())
        scores.append(task.scores(outputs).double().cpu().numpy())
    model.to("cpu")
    if seen == 0:
        raise DataError("the held-out set is empty: there is nothing to evaluate the model on")
    return evaluate_scores(
        task.kind,
        np.concatenate(targets),
        np.concatenate(scores),
        loss=loss / seen,
        num_classes=task.num_classes,
        extra=task.metrics,
    )
