"""Tests for the diabetes and imaging tasks and the example task package."""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from fedvault.examples import diabetes, imaging
from fedvault.privacy.dp import AccountantState, make_private
from fedvault.task import Task
from fedvault.task_registry import load_task

TASK_PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "task-package"

# Opacus' hooks warn when a model's first layer gets no input gradient: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture
def oncology(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example task package, imported from its source directory."""
    monkeypatch.syspath_prepend(str(TASK_PACKAGE))
    import oncology_task

    yield oncology_task
    sys.modules.pop("oncology_task", None)


def _num_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_entry_points_resolve_to_the_modules_tasks() -> None:
    assert load_task("diabetes").task is diabetes.TASK
    assert load_task("imaging").task is imaging.TASK
    assert diabetes.EXAMPLE is diabetes.TASK and imaging.EXAMPLE is imaging.TASK


def test_diabetes_data() -> None:
    train, test = diabetes.load_data(0)
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (353, 10) and x_test.shape == (89, 10)
    assert y_train.shape == (353,) and y_test.shape == (89,)
    assert {t.dtype for t in (x_train, y_train, x_test, y_test)} == {torch.float32}
    # Features and target standardised with the training part's statistics only.
    np.testing.assert_allclose(x_train.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(0, unbiased=False).numpy(), 1.0, atol=1e-4)
    assert abs(y_train.mean().item()) < 1e-5
    assert abs(y_train.std(unbiased=False).item() - 1.0) < 1e-4
    assert 0 < abs(y_test.mean().item()) < 0.5
    # The scaling can be undone: back to progression scores (25 to 346).
    assert test.target_mean == train.target_mean  # type: ignore[attr-defined]
    units = y_test.double() * test.target_std + test.target_mean  # type: ignore[attr-defined]
    assert units.min().item() >= 25 - 1e-3 and units.max().item() <= 346 + 1e-3


def test_diabetes_split_depends_on_seed() -> None:
    a, _ = diabetes.load_data(0)
    b, _ = diabetes.load_data(0)
    c, _ = diabetes.load_data(1)
    assert all(torch.equal(p, q) for p, q in zip(a.tensors, b.tensors, strict=True))  # type: ignore[attr-defined]
    assert not torch.equal(a.tensors[1], c.tensors[1])  # type: ignore[attr-defined]


def test_imaging_data() -> None:
    train, test = imaging.load_data(0)
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    size = imaging.IMAGE_SIZE
    assert x_train.shape == (imaging.NUM_TRAIN, 1, size, size)
    assert x_test.shape == (imaging.NUM_TEST, 1, size, size)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.isfinite(x_train).all() and torch.isfinite(x_test).all()
    # Balanced classes 0..3 in both parts.
    for labels in (y_train, y_test):
        counts = np.bincount(labels.numpy(), minlength=imaging.NUM_CLASSES)
        assert len(counts) == imaging.NUM_CLASSES == len(imaging.CLASSES)
        assert counts.max() - counts.min() <= 1
    # Not given away by brightness: class means of the pixels are close.
    means = [x_train[y_train == c].mean().item() for c in range(imaging.NUM_CLASSES)]
    assert max(means) - min(means) < 0.1


def test_imaging_data_is_generated_from_the_seed() -> None:
    a = imaging.make_images(40, np.random.default_rng(3))
    b = imaging.make_images(40, np.random.default_rng(3))
    c = imaging.make_images(40, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    ("task", "input_shape", "weights"),
    [
        (diabetes.TASK, (10,), (11, 11)),
        (imaging.TASK, (1, 32, 32), (1_000_000, 2_000_000)),
    ],
    ids=["diabetes", "imaging"],
)
def test_models(task: Task, input_shape: tuple[int, ...], weights: tuple[int, int]) -> None:
    _check_model(task, input_shape, weights)


def test_task_package(oncology: ModuleType) -> None:
    task = oncology.TASK
    assert isinstance(task, Task)
    assert (task.name, task.kind, task.num_outputs) == ("oncology-mlp", "binary", 2)
    assert task.site_data is None  # hospitals use the generic CSV/Parquet reader
    assert load_task("oncology_task:TASK").task is task
    _check_model(task, (30,), (530, 530))
    train, test = task.load_data(0)
    assert train.tensors[0].shape == (455, 30) and test.tensors[0].shape == (114, 30)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    np.testing.assert_allclose(train.tensors[0].mean(0).numpy(), 0.0, atol=1e-5)


def test_task_package_metadata() -> None:
    project = tomllib.loads((TASK_PACKAGE / "pyproject.toml").read_text())["project"]
    assert (project["name"], project["version"]) == ("fedvault-oncology-task", "0.1.0")
    assert project["dependencies"] == []
    assert project["entry-points"]["fedvault.tasks"] == {"oncology-mlp": "oncology_task:TASK"}
    assert (TASK_PACKAGE / "README.md").is_file()


def _check_model(task: Task, input_shape: tuple[int, ...], weights: tuple[int, int]) -> None:
    """Opacus accepts the model, a forward pass fits, one DP-SGD step trains it."""
    torch.manual_seed(0)
    model = task.build_model()
    assert weights[0] <= _num_weights(model) <= weights[1]
    ModuleValidator.validate(model, strict=True)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(6, *input_shape)
    out = model(x)
    assert out.shape == (6, task.num_outputs)
    # A fresh model each call: hospitals must not share parameter tensors.
    other = task.build_model()
    assert all(
        p.data_ptr() != q.data_ptr()
        for p, q in zip(model.parameters(), other.parameters(), strict=True)
    )
    # One DP-SGD step with the task's loss.
    y = (
        torch.arange(6) % task.num_outputs
        if task.is_classification
        else torch.randn(6, dtype=torch.float32)
    )
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6),
        noise_multiplier=1.0,
        max_grad_norm=task.defaults.max_grad_norm,
        state=AccountantState("prv"),
    )
    private.optimizer.zero_grad()
    task.criterion()(private.module(x), y).backward()
    private.optimizer.step()
    assert private.state().steps == 1
    assert all(not torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
