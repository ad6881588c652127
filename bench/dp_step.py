"""Measurement 3: one DP-SGD step against one non-private SGD step.

Same model initialisation, same batch, same run. The private step is what a
hospital runs (:func:`fedvault.privacy.dp.make_private`: per-sample gradients,
clipping to C, Gaussian noise); each Opacus grad-sample mode is measured too,
as a lever. Models: the digits CNN (``examples/digits.py``, ~6k weights) and a
~1M-parameter MLP.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.common import Row, Section
from fedvault.examples.digits import build_model as digits_cnn
from fedvault.privacy.dp import AccountantState, make_private

__all__ = ["mlp_1m", "run"]

BATCH = 64
MODES = ("hooks", "functorch", "ew", "ghost")


def mlp_1m() -> nn.Module:
    """512 -> 1024 -> 512 -> 10 with tanh: 1,055,242 weights."""
    return nn.Sequential(
        nn.Linear(512, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10)
    )


def _data(model_name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (n, 1, 8, 8) if model_name == "digits_cnn" else (n, 512)
    return torch.rand(shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _per_step(step: Callable[[], None], steps: int, repeats: int = 5) -> float:
    for _ in range(5):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def _plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _private_step_ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    private = make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, state=AccountantState(),
    )
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        private.optimizer.zero_grad(set_to_none=True)
        loss_fn(private.module(x), y).backward()
        private.optimizer.step()

    return step


def _private_step_mode(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str
) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    engine = PrivacyEngine(accountant="prv")
    loss_fn: Any = nn.CrossEntropyLoss()
    kwargs: dict[str, Any] = {
        "module": model, "optimizer": opt, "data_loader": loader, "noise_multiplier": 1.0,
        "max_grad_norm": 1.0, "poisson_sampling": True, "grad_sample_mode": mode,
    }
    if mode == "ghost":
        module, dp_opt, loss_fn, _ = engine.make_private(criterion=loss_fn, **kwargs)
    else:
        module, dp_opt, _ = engine.make_private(**kwargs)

    def step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(x), y)
        loss.backward()
        dp_opt.step()

    return step


def _measure(name: str, build: Callable[[], nn.Module], steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = build()
    x, y = _data(name, BATCH)
    out: dict[str, Any] = {"params": sum(p.numel() for p in base.parameters())}
    out["plain_step_s"] = _per_step(_plain_step(copy.deepcopy(base), x, y), steps)
    out["ours_step_s"] = _per_step(_private_step_ours(copy.deepcopy(base), x, y), steps)
    modes: dict[str, float | str] = {}
    for mode in MODES:
        try:
            modes[mode] = _per_step(_private_step_mode(copy.deepcopy(base), x, y, mode), steps)
        except Exception as exc:  # a mode Opacus cannot run on this model is reported, not fatal
            modes[mode] = f"failed: {type(exc).__name__}: {exc}"[:200]
    out["modes_step_s"] = modes
    out["ratio"] = out["ours_step_s"] / out["plain_step_s"]
    return out


def run(quick: bool = False) -> Section:
    warnings.filterwarnings("ignore")
    cnn = _measure("digits_cnn", digits_cnn, steps=20 if quick else 60)
    mlp = _measure("mlp_1m", mlp_1m, steps=5 if quick else 15)
    section = Section(name="dp")
    section.keys = {
        "dp_step_ratio_digits_cnn": cnn["ratio"],
        "dp_step_ratio_mlp": mlp["ratio"],
        "baseline_dp_plain_step_digits_cnn_s": cnn["plain_step_s"],
        "baseline_dp_plain_step_mlp_s": mlp["plain_step_s"],
        "dp_step_digits_cnn_s": cnn["ours_step_s"],
        "dp_step_mlp_s": mlp["ours_step_s"],
    }
    section.details = {"digits_cnn": cnn, "mlp_1m": mlp}
    section.rows = [
        Row("DP-SGD step, digits CNN", cnn["ours_step_s"] * 1e3, cnn["plain_step_s"] * 1e3, "ms",
            "<= 1.5x", cnn["ratio"] <= 1.5),
        Row("DP-SGD step, 1M MLP", mlp["ours_step_s"] * 1e3, mlp["plain_step_s"] * 1e3, "ms",
            "", None),
    ]
    return section
