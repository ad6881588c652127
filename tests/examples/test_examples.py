"""Tests for the example tasks: registry, data sets, models, labels."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from fedvault.errors import InvalidConfigError
from fedvault.examples import (
    BUILT_IN,
    TrainingDefaults,
    breast_cancer,
    custom_model,
    digits,
    get_example,
)
from fedvault.task import Task
from fedvault.task_registry import describe, installed_tasks, load_task

EXAMPLES = {name: get_example(name) for name in BUILT_IN}


def test_built_ins_are_registered_as_entry_points_like_any_task() -> None:
    installed = installed_tasks()
    for name in BUILT_IN:
        module = "fedvault.examples." + name.replace("-", "_")
        assert installed[name] == f"{module}:TASK"
        assert load_task(name).module == module
    assert get_example("breast-cancer") is breast_cancer.TASK is breast_cancer.EXAMPLE
    assert get_example("digits") is digits.TASK
    assert load_task("fedvault.examples.digits:TASK").task is digits.TASK


def test_unknown_task() -> None:
    with pytest.raises(InvalidConfigError, match=r"^unknown task 'x': installed tasks are "):
        get_example("x")
    with pytest.raises(InvalidConfigError, match="fails to import: module 'no_such_mod'"):
        load_task("no_such_mod:TASK")
    with pytest.raises(InvalidConfigError, match=re.escape("is a int, not a fedvault.task.Task")):
        load_task("fedvault.examples.breast_cancer:NUM_CLASSES")


def test_description_carries_each_tasks_own_defaults() -> None:
    # What a job file is resolved with (in a child process, no torch here) is
    # what the task trains with.
    spec = describe("breast-cancer")
    task = EXAMPLES["breast-cancer"]
    assert (spec.name, spec.defaults, spec.kind) == (task.name, task.defaults, task.kind)
    with pytest.raises(InvalidConfigError, match="unknown task 'x'"):
        describe("x")


def test_breast_cancer_data() -> None:
    train, test = breast_cancer.load_data(0)
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (455, 30) and x_test.shape == (114, 30)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == {0, 1}
    # Stratified: both parts keep the 212/357 malignant/benign ratio (37.3 %).
    assert abs(y_train.float().mean().item() - 357 / 569) < 0.01
    assert abs(y_test.float().mean().item() - 357 / 569) < 0.01
    # Scaler fit on train only: train is standardised exactly, test only roughly.
    np.testing.assert_allclose(x_train.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(0, unbiased=False).numpy(), 1.0, atol=1e-4)
    test_mean = np.abs(x_test.mean(0).numpy())
    assert test_mean.max() > 1e-3 and test_mean.max() < 0.5


def test_breast_cancer_split_depends_on_seed() -> None:
    a, _ = breast_cancer.load_data(0)
    b, _ = breast_cancer.load_data(0)
    c, _ = breast_cancer.load_data(1)
    assert torch.equal(a.tensors[0], b.tensors[0])  # type: ignore[attr-defined]
    assert not torch.equal(a.tensors[0], c.tensors[0])  # type: ignore[attr-defined]


def test_digits_data() -> None:
    train, test = digits.load_data(0)
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    x_train, _ = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_test.dtype == torch.int64
    assert x_train.min().item() == 0.0 and x_train.max().item() == 1.0
    # Stratified: every digit makes up about a tenth of the test set.
    counts = np.bincount(y_test.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


@pytest.mark.parametrize(
    ("example", "input_shape"),
    [
        (breast_cancer.EXAMPLE, (30,)),
        (digits.EXAMPLE, (1, 8, 8)),
        (custom_model.TASK, (20,)),
    ],
)
def test_models(example: Task, input_shape: tuple[int, ...]) -> None:
    model = example.build_model()
    ModuleValidator.validate(model, strict=True)
    out = model(torch.zeros(5, *input_shape))
    assert out.shape == (5, example.num_outputs)
    # A fresh model each call: hospitals must not share parameter tensors.
    other = example.build_model()
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(model.parameters(), other.parameters(), strict=True)
    )


def test_digits_model_is_small() -> None:
    # DP-SGD noise grows with the number of weights: keep the CNN small.
    model = digits.build_model()
    assert sum(p.numel() for p in model.parameters()) < 10_000


@pytest.mark.parametrize("example", [*EXAMPLES.values(), custom_model.TASK])
def test_defaults(example: Task) -> None:
    d = example.defaults
    assert isinstance(d, TrainingDefaults)
    assert d.batch_size >= 1 and d.local_epochs >= 1
    assert d.learning_rate > 0 and d.max_grad_norm > 0 and 0 <= d.momentum < 1


class _Pairs(Dataset[tuple[Tensor, int]]):
    """A data set with neither tensors nor targets: labels come from iteration."""

    def __init__(self, labels: list[int]) -> None:
        self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.zeros(2), self._labels[index]


def test_labels() -> None:
    example = breast_cancer.EXAMPLE
    train, _ = example.load_data(0)
    labels = example.targets(train)
    assert labels.dtype == np.int64 and labels.shape == (455,)
    np.testing.assert_array_equal(labels, train.tensors[1].numpy())  # type: ignore[attr-defined]
    subset: Dataset[Any] = Subset(train, [4, 0, 7])
    np.testing.assert_array_equal(example.targets(subset), labels[[4, 0, 7]])
    np.testing.assert_array_equal(example.targets(_Pairs([2, 0, 1])), [2, 0, 1])


def test_custom_dataset() -> None:
    train, test = custom_model.load_data(0)
    assert len(train) == 1500 and len(test) == 500  # type: ignore[arg-type]
    x, y = train[0]
    assert x.shape == (20,) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = custom_model.TASK.targets(train)
    assert labels.shape == (1500,) and set(labels.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(labels[:3], [int(train[i][1]) for i in range(3)])
