"""Local training and evaluation at a hospital.

Training is always DP-SGD (Opacus, Poisson sampling, per-sample clipping): the
model that leaves the hospital — even encrypted — is already differentially
private with respect to each patient record, so the privacy guarantee does not
rest on the encryption alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedvault.config import TrainingConfig
from fedvault.privacy.dp import AccountantState, DpPlan, make_private
from fedvault.privacy.errors import MalformedUpdateError
from fedvault.task import Task

if TYPE_CHECKING:
    from fedvault.metrics import EvalResult

__all__ = ["LocalResult", "evaluate", "get_weights", "pick_device", "set_weights", "train_private"]


@dataclass(frozen=True)
class LocalResult:
    """What one round of local DP-SGD produced."""

    loss: float
    state: AccountantState  # accountant history after this round (all rounds of the job)
    round_steps: int


def pick_device(preference: str = "auto") -> torch.device:
    """The device a hospital trains on: ``"auto"`` (its GPU when it has one, else the
    CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    InvalidConfigError
        For an unknown name, or a GPU this machine does not have (naming what it has).
    """
    from fedvault.privacy.errors import InvalidConfigError

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
    """The model's state as named numpy arrays (the order is the state dict's);
    ``names``: only those (the tensors a task shares, see ``Task.shared_names``)."""
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
) -> LocalResult:
    """Run one round of local DP-SGD, continuing the job's accountant ``state``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )
    private = make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        state=state,
    )
    criterion = task.criterion()
    total_loss, total_seen, steps = 0.0, 0, 0
    for _ in range(training.local_epochs):
        for features, labels in private.data_loader:
            features, labels = features.to(device), labels.to(device)
            private.optimizer.zero_grad(set_to_none=True)
            # Poisson sampling can draw an empty batch; Opacus still takes the
            # (noise-only) step so the accountant's step count stays exact.
            logits = private.module(features)
            loss = criterion(logits, labels) if len(labels) else logits.sum() * 0.0
            loss.backward()
            private.optimizer.step()
            steps += 1
            if len(labels):
                total_loss += float(loss.detach()) * len(labels)
                total_seen += len(labels)
    model.to("cpu")
    return LocalResult(
        loss=total_loss / max(total_seen, 1),
        state=private.state(),
        round_steps=steps,
    )


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
    from fedvault.metrics import evaluate_scores
    from fedvault.privacy.errors import DataError

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
