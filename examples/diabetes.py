"""Diabetes: DP-SGD linear regression of disease progression.

442 patients of Efron et al.'s diabetes study ("Least Angle Regression",
Annals of Statistics, 2004), bundled with scikit-learn, so the example runs
offline: ten baseline variables (age, sex, body-mass index, mean blood
pressure and six blood-serum measurements) and the target, a quantitative
measure of disease progression one year after baseline (25 to 346). It is
fedvault's regression example: one real output, mean squared error, and RMSE
as the metric ``--round best`` picks by.

Scaling. Features are standardised with the mean and standard deviation of
the training part (scikit-learn's own pre-scaling is not used); the target
is standardised the same way, so the model predicts the progression in
training standard deviations (about 77 points). An unscaled target (mean
about 152) would make the per-sample gradients of the squared error
hundreds of times the clipping bound, so clipping would throw away nearly
all of their magnitude, and the learning rate would have to absorb the
target's units. The test set carries the statistics as ``target_mean`` and
``target_std`` (attributes of the data set) to map predictions back:
``progression = prediction * target_std + target_mean``.

The model is linear regression, ``nn.Linear(10, 1)``: 11 weights. A tanh
MLP (10-8-1, 10-16-1) was measured too and did not beat it, with DP-SGD or
without (see ``examples/README.md``): on 442 records least squares is about
the best non-private fit (test R² about 0.46), and DP-SGD's noise grows with
every weight it must cover. At ε = 3 over 3 hospitals x 10 rounds the
defaults (full batch, learning rate 0.5, two local epochs) reach a mean test
R² of about 0.44.

Run it::

    python -m fedvault.examples.diabetes --hospitals 3 --rounds 10
"""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedvault.task import Task, TrainingDefaults

__all__ = ["EXAMPLE", "NUM_FEATURES", "TASK", "build_model", "load_data", "main"]

NUM_FEATURES = 10


def build_model() -> nn.Module:
    """Linear regression: one linear layer to one output (11 weights)."""
    return nn.Linear(NUM_FEATURES, 1)


def load_data(seed: int) -> tuple[Dataset[Any], Dataset[Any]]:
    """Random 80/20 split; features and target standardised with training statistics.

    Nothing about the test records leaks into the scaling (in a real
    consortium each hospital standardises with statistics the consortium has
    agreed on).

    Returns
    -------
    tuple of TensorDataset
        ``(train, test)`` with 353 and 89 records: ``float32`` features of
        shape ``(n, 10)`` and ``float32`` standardised targets of shape
        ``(n,)``. Both carry ``target_mean`` and ``target_std`` (floats, in
        progression points) to undo the target's scaling.
    """
    x, y = load_diabetes(return_X_y=True, scaled=False)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed)
    x_mean, x_std = x_train.mean(axis=0), x_train.std(axis=0)
    y_mean, y_std = float(y_train.mean()), float(y_train.std())
    datasets = []
    for features, target in ((x_train, y_train), (x_test, y_test)):
        data = TensorDataset(
            torch.as_tensor((features - x_mean) / x_std, dtype=torch.float32),
            torch.as_tensor((target - y_mean) / y_std, dtype=torch.float32),
        )
        data.target_mean, data.target_std = y_mean, y_std  # type: ignore[attr-defined]
        datasets.append(data)
    return datasets[0], datasets[1]


TASK = Task(
    kind="regression",
    name="diabetes",
    build_model=build_model,
    load_data=load_data,
    num_outputs=1,
    defaults=TrainingDefaults(
        batch_size=128, learning_rate=0.5, local_epochs=2, max_grad_norm=1.0, momentum=0.0
    ),
    description="linear regression of disease progression on scikit-learn's diabetes data "
    "(442 records)",
)

#: The same object under the name the other examples also export.
EXAMPLE = TASK


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Simulate a 3-hospital consortium on this example (``--help`` for options)."""
    # Imported here: a task definition loads without the simulation stack.
    from fedvault.app.simulation import run_cli

    return run_cli(TASK, argv, hospitals=3, rounds=10)


if __name__ == "__main__":
    main()
