"""Plug in your own model and data set: a template to copy.

A federated task is a :class:`~fedvault.task.Task`: a function
that builds your ``nn.Module``, a function that returns ``(train, test)``
``Dataset`` objects, and DP-SGD training defaults. Here: a two-layer MLP on a
generated classification problem, held in a hand-written ``Dataset`` subclass
(any map-style data set whose items are ``(features, label)`` works).

Run it::

    python -m fedvault.examples.custom_model --out runs/custom
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import make_classification
from torch import Tensor, nn
from torch.utils.data import Dataset

from fedvault.task import Task, TrainingDefaults

__all__ = ["TASK", "TabularDataset", "build_model", "load_data", "main"]


class TabularDataset(Dataset[tuple[Tensor, Tensor]]):
    """Rows of features with one integer label each, as your own loader might hold them.

    ``targets`` is optional; with it, partitioning reads every label at once
    instead of indexing each sample.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = torch.as_tensor(features, dtype=torch.float32)
        self.targets = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.features[index], self.targets[index]


def build_model() -> nn.Module:
    """A two-layer MLP. No BatchNorm: Opacus needs per-sample gradients."""
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))


def load_data(seed: int) -> tuple[Dataset[Any], Dataset[Any]]:
    """A generated 3-class problem, 1,500 train and 500 test rows."""
    x, y = make_classification(
        n_samples=2000, n_features=20, n_informative=8, n_classes=3, random_state=seed
    )
    return TabularDataset(x[:1500], y[:1500]), TabularDataset(x[1500:], y[1500:])


TASK = Task(
    kind="multiclass",
    name="custom-mlp",
    build_model=build_model,
    load_data=load_data,
    num_outputs=3,
    defaults=TrainingDefaults(batch_size=125, learning_rate=1.0, local_epochs=2),
    description="a two-layer MLP on a generated 3-class problem",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Simulate three hospitals for five rounds on ``TASK``."""
    from fedvault.app.simulation import simulate
    from fedvault.config import JobConfig

    parser = argparse.ArgumentParser(description="Federated training of your own model.")
    parser.add_argument("--out", type=Path, default=Path("runs/custom-mlp"))
    args = parser.parse_args(argv)

    config = JobConfig.for_task(TASK, hospitals=3, rounds=5)
    report: dict[str, Any] = simulate(config, task=TASK, out_dir=args.out)
    final = report["final"]
    print(f"accuracy {final['accuracy']:.3f} at epsilon {final['epsilon_max']:.2f}")
    return report


if __name__ == "__main__":
    main()
