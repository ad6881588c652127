"""Measurement 3: one DP-SGD step against one non-private SGD step.

Same model initialisation, same batch, same optimizer, same run. The private
step is what a hospital runs (:func:`fedvault.privacy.dp.make_private` with
the task's loss, as ``train_private`` calls it: Poisson-sampled DP-SGD,
per-sample clipping to C in the grad-sample mode ``choose_grad_sample_mode``
picks for the model, reported as ``grad_sample_mode``: ``ew`` for the
digits CNN, ``ghost`` for the MLP; Gaussian noise); the baseline is the same
step without privacy. Three cases:

* ``digits_cnn``: the digits example as a hospital trains it, its CNN, its
  optimizer (``EXAMPLE.defaults``) and its batch: ``min(batch_size, n)`` for a
  hospital of the example's default 4-hospital consortium (359 images, so one
  full-batch step per epoch); this is ``dp_step_ratio_digits_cnn``;
* ``digits_cnn_b64``: the same at batch 64 (the usual DP-SGD benchmark size);
* ``mlp_1m``: a ~1M-parameter MLP at batch 64, where per-sample gradients are
  64 copies of the model.

Each case's private step is measured twice, side by side: with torch's
generator (``dp_step_ratio_*``, ``fedvault simulate``'s default) and with the
noise and Poisson batches from the CSPRNG, as deployed hospitals draw them
(``dp_step_ratio_secure_rng_*``; ``secure_rng_vs_fast_step_*`` is the ratio
of the two). ``secure_rng_vs_fast_noise_{1m,10m}``: one noise draw of 1M and
10M values, the CSPRNG's robust Gaussian against ``torch.normal``.

Levers, each measured alone against the same baseline (``details.dp``): the
Opacus grad-sample modes called directly (``ew``, ``functorch``, and ``ghost``
with the loss wrapped by ``make_private(criterion=...)`` as ghost clipping
requires; raw Opacus ``ew`` fails an empty batch, which the product's step
replaces by ``PrivateTraining.noise_only_step``),
two torch threads instead of one (both sides), and channels-last tensors (both
sides). Each lever also reports whether it keeps the product's semantics: the
parameters after one noise-free step must equal the hooks step's (same
per-sample clipping), and it must take an empty Poisson batch (a noise-only
step the accountant counts). ``torch.compile`` is not measured: it compiles
offline here but takes minutes per model shape, and Poisson batches change the
shape every step, against milliseconds of training per round.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.common import Row, Section, cpu_clock
from fedvault.examples.digits import EXAMPLE as DIGITS
from fedvault.examples.digits import build_model as digits_cnn
from fedvault.privacy.dp import AccountantState, GradSampleMode, make_private

__all__ = ["mlp_1m", "run", "secure_noise_cost"]

MODES = ("ew", "functorch", "ghost")
DIGITS_HOSPITALS = 4  # the digits example's default consortium (examples/digits.py main)
TARGET = 1.5

Step = Callable[[], None]
#: The grad-sample mode ``make_private`` chose, by ``id`` of the model (for the report).
step_mode: dict[int, str] = {}


def mlp_1m() -> nn.Module:
    """512 -> 1024 -> 512 -> 10 with tanh: 1,055,242 weights."""
    return nn.Sequential(
        nn.Linear(512, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 10)
    )


def digits_batch() -> int:
    """The batch one digits hospital trains with (``client_app._train``: min(batch, n))."""
    train, _ = DIGITS.load_data(0)
    n = len(train) // DIGITS_HOSPITALS  # type: ignore[arg-type]
    return min(DIGITS.defaults.batch_size, n)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: int
    lr: float
    momentum: float
    steps: int  # per timed block
    image: bool  # input is (n, 1, 8, 8), so channels-last applies


def _data(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (case.batch, 1, 8, 8) if case.image else (case.batch, 512)
    return torch.rand(shape, generator=g), torch.randint(0, 10, (case.batch,), generator=g)


def _interleaved(
    steps: dict[str, Step],
    n: int,
    repeats: int,
    clock: Callable[[], float] = cpu_clock,
    warmup: int = 2,
) -> dict[str, float]:
    """Per-step time of each configuration: blocks of ``n`` steps, round-robin, minimum kept.

    Round-robin so that every configuration sees the same machine load (the
    machine is shared); the minimum is the least-disturbed block. One torch
    thread does all the work on the calling thread, so its CPU time is the
    step's cost (see ``bench.common``).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            start = clock()
            for _ in range(n):
                step()
            best[name] = min(best[name], (clock() - start) / n)
    return best


def _optimizer(model: nn.Module, case: Case) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=case.lr, momentum=case.momentum)


def _plain(model: nn.Module, case: Case, x: torch.Tensor, y: torch.Tensor) -> Step:
    opt = _optimizer(model, case)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _loss(criterion: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """As ``client/training.py``: an empty Poisson batch still takes a (noise-only) step."""
    return criterion(logits, labels) if len(labels) else logits.sum() * 0.0


def _ours(
    model: nn.Module,
    case: Case,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: float = 1.0,
    secure_rng: bool = False,
    mode: GradSampleMode = "auto",
) -> Step:
    """The product's private step: ``make_private`` as ``train_private`` calls it.

    With the task's loss (cross-entropy), so ``"auto"`` picks the mode
    ``train_private`` trains this model with (``choose_grad_sample_mode``).
    ``secure_rng``: noise from the CSPRNG (``privacy/csprng.py``), as deployed
    hospitals draw it; off, torch's generator (``fedvault simulate``'s default).
    """
    loader = DataLoader(TensorDataset(x, y), batch_size=case.batch)
    private = make_private(
        module=model,
        optimizer=_optimizer(model, case),
        data_loader=loader,
        noise_multiplier=noise if noise > 0 else 1e-12,  # make_private refuses 0
        max_grad_norm=1.0,
        state=AccountantState(),
        secure_rng=secure_rng,
        grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
    )
    if noise == 0:
        private.optimizer.noise_multiplier = 0.0
    criterion = private.criterion
    step_mode[id(model)] = private.grad_sample_mode

    def step(xb: torch.Tensor = x, yb: torch.Tensor = y) -> None:
        private.optimizer.zero_grad(set_to_none=True)
        if not len(yb) and private.grad_sample_mode == "ew":
            private.noise_only_step()  # as client/training.py: ew refuses batch 0
            return
        _loss(criterion, private.module(xb), yb).backward()
        private.optimizer.step()

    return step


def _mode(
    model: nn.Module, case: Case, x: torch.Tensor, y: torch.Tensor, mode: str, noise: float = 1.0
) -> Step:
    """Opacus directly, with another grad-sample mode (same Poisson sampling, C and noise)."""
    loader = DataLoader(TensorDataset(x, y), batch_size=case.batch)
    engine = PrivacyEngine(accountant="prv")
    kwargs: dict[str, Any] = {
        "module": model,
        "optimizer": _optimizer(model, case),
        "data_loader": loader,
        "noise_multiplier": noise,
        "max_grad_norm": 1.0,
        "poisson_sampling": True,
        "grad_sample_mode": mode,
    }
    criterion: Any = nn.CrossEntropyLoss()
    if mode == "ghost":  # ghost clipping runs two backward passes inside the wrapped loss
        module, dp_opt, criterion, _ = engine.make_private(criterion=criterion, **kwargs)
    else:
        module, dp_opt, _ = engine.make_private(**kwargs)

    def step(xb: torch.Tensor = x, yb: torch.Tensor = y) -> None:
        dp_opt.zero_grad(set_to_none=True)
        _loss(criterion, module(xb), yb).backward()
        dp_opt.step()

    return step


def _semantics(
    base: nn.Module, case: Case, x: torch.Tensor, y: torch.Tensor, mode: str
) -> dict[str, Any]:
    """Does ``mode`` clip like hooks (noise-free step, same result) and take an empty batch?"""
    ref_model, model = copy.deepcopy(base), copy.deepcopy(base)
    _ours(ref_model, case, x, y, noise=0.0, mode="hooks")()
    out: dict[str, Any] = {}
    try:
        step = _mode(model, case, x, y, mode, noise=0.0)
        step()
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(ref_model.parameters(), model.parameters(), strict=True)
        )
        out["max_param_diff_vs_hooks"] = diff
        out["same_clipping"] = diff < 1e-5
    except Exception as exc:
        out["same_clipping"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
        return out
    try:
        step(x[:0], y[:0])
        out["empty_batch"] = "ok"
    except Exception as exc:
        out["empty_batch"] = f"fails: {type(exc).__name__}: {exc}"[:200]
    return out


def _measure(case: Case, repeats: int, warmup: int = 2) -> dict[str, Any]:
    torch.manual_seed(0)
    base = case.build()
    x, y = _data(case)
    ours_model = copy.deepcopy(base)
    configs: dict[str, Step] = {
        "plain": _plain(copy.deepcopy(base), case, x, y),
        "ours": _ours(ours_model, case, x, y),
        "ours_secure_rng": _ours(copy.deepcopy(base), case, x, y, secure_rng=True),
    }
    failed: dict[str, str] = {}
    for mode in MODES:
        try:
            configs[mode] = _mode(copy.deepcopy(base), case, x, y, mode)
        except Exception as exc:  # a mode Opacus cannot run on this model is reported
            failed[mode] = f"failed: {type(exc).__name__}: {exc}"[:200]
    if case.image:
        cl = torch.channels_last
        xc = x.contiguous(memory_format=cl)
        configs["plain_channels_last"] = _plain(
            copy.deepcopy(base).to(memory_format=cl), case, xc, y
        )
        configs["ours_channels_last"] = _ours(copy.deepcopy(base).to(memory_format=cl), case, xc, y)
    times = _interleaved(configs, case.steps, repeats, warmup=warmup)
    # Two threads for both sides, as a separate block (the thread count is
    # process-wide), in wall time: the second thread's work is not on this one's clock.
    torch.set_num_threads(2)
    try:
        two = _interleaved(
            {"plain": configs["plain"], "ours": configs["ours"]},
            case.steps,
            repeats,
            time.perf_counter,
            warmup,
        )
    finally:
        torch.set_num_threads(1)
    plain = times["plain"]
    levers: dict[str, Any] = {
        mode: {
            "step_s": times[mode],
            "ratio": times[mode] / plain,
            **_semantics(base, case, x, y, mode),
        }
        for mode in MODES
        if mode in times
    }
    levers.update({mode: {"error": why} for mode, why in failed.items()})
    levers["threads_2"] = {
        "clock": "wall",
        "plain_step_s": two["plain"],
        "step_s": two["ours"],
        "ratio": two["ours"] / two["plain"],
    }
    if case.image:
        levers["channels_last"] = {
            "plain_step_s": times["plain_channels_last"],
            "step_s": times["ours_channels_last"],
            "ratio": times["ours_channels_last"] / times["plain_channels_last"],
        }
    return {
        "params": sum(p.numel() for p in base.parameters()),
        "batch": case.batch,
        "lr": case.lr,
        "momentum": case.momentum,
        "grad_sample_mode": step_mode[id(ours_model)],
        "plain_step_s": plain,
        "ours_step_s": times["ours"],
        "ratio": times["ours"] / plain,
        "secure_rng_step_s": times["ours_secure_rng"],
        "secure_rng_ratio": times["ours_secure_rng"] / plain,
        "secure_rng_vs_fast": times["ours_secure_rng"] / times["ours"],
        "clock": "thread CPU time",
        "levers": levers,
    }


def _noise_draws(quick: bool) -> dict[str, dict[str, float]]:
    """One noise draw the size of a model: the CSPRNG against ``torch.normal``, interleaved.

    ``quick``: the 1M draw only (the 10M one is the same code, ~1 s a draw on the CSPRNG side).
    """
    from fedvault.privacy.csprng import ChaChaRandom

    rng = ChaChaRandom()
    out: dict[str, dict[str, float]] = {}
    sizes = (("1m", 1_000_000),) if quick else (("1m", 1_000_000), ("10m", 10_000_000))
    for name, n in sizes:
        ref = torch.empty(n)
        times = _interleaved(
            {
                "secure": lambda ref=ref: rng.gaussian_like(ref, 1.0),
                "fast": lambda n=n: torch.normal(0.0, 1.0, size=(n,)),
            },
            1,
            1 if quick else 5,
            warmup=1 if quick else 2,
        )
        out[name] = {
            "values": n,
            "secure_s": times["secure"],
            "fast_s": times["fast"],
            "ratio": times["secure"] / times["fast"],
        }
    return out


def secure_noise_cost(quick: bool = False) -> dict[str, Any]:
    """What the CSPRNG alone costs, for section ``secagg`` (the same code as :func:`run`).

    The digits CNN's private step as trained (batch as in :func:`digits_batch`), with
    noise and Poisson batches from the CSPRNG vs from torch's generator, interleaved
    beside the non-private step, one torch thread; and :func:`_noise_draws`.
    """
    warnings.filterwarnings("ignore")
    d = DIGITS.defaults
    case = Case("digits_cnn", digits_cnn, digits_batch(), d.learning_rate, d.momentum, 10, True)
    if quick:
        case = replace(case, steps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        base = case.build()
        x, y = _data(case)
        times = _interleaved(
            {
                "plain": _plain(copy.deepcopy(base), case, x, y),
                "fast": _ours(copy.deepcopy(base), case, x, y),
                "secure": _ours(copy.deepcopy(base), case, x, y, secure_rng=True),
            },
            case.steps,
            1 if quick else 7,
            warmup=1 if quick else 2,
        )
        noise = _noise_draws(quick)
    finally:
        torch.set_num_threads(threads)
    return {
        "case": case.name,
        "batch": case.batch,
        "clock": "thread CPU time",
        "plain_step_s": times["plain"],
        "fast_step_s": times["fast"],
        "secure_step_s": times["secure"],
        "secure_vs_fast": times["secure"] / times["fast"],
        "noise_draw": noise,
    }


def run(quick: bool = False) -> Section:
    warnings.filterwarnings("ignore")
    d = DIGITS.defaults
    cases = (
        Case("digits_cnn", digits_cnn, digits_batch(), d.learning_rate, d.momentum, 10, True),
        Case("digits_cnn_b64", digits_cnn, 64, d.learning_rate, d.momentum, 20, True),
        Case("mlp_1m", mlp_1m, 64, 0.01, 0.9, 4, False),
    )
    if quick:  # a smoke test: every configuration steps, one block of one step each
        cases = tuple(replace(c, steps=1) for c in cases)
    # One thread, as each simulated hospital trains (one Ray actor per core):
    # with two threads on two shared cores, tiny kernels measure contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = {
            c.name: _measure(c, repeats=1 if quick else 7, warmup=1 if quick else 2) for c in cases
        }
        noise = _noise_draws(quick)
    finally:
        torch.set_num_threads(threads)
    cnn, b64, mlp = res["digits_cnn"], res["digits_cnn_b64"], res["mlp_1m"]
    section = Section(name="dp", details={**res, "noise_draw": noise})
    section.keys = {
        "dp_step_ratio_digits_cnn": cnn["ratio"],
        "dp_step_ratio_digits_cnn_b64": b64["ratio"],
        "dp_step_ratio_mlp": mlp["ratio"],
        "baseline_dp_plain_step_digits_cnn_s": cnn["plain_step_s"],
        "baseline_dp_plain_step_digits_cnn_b64_s": b64["plain_step_s"],
        "baseline_dp_plain_step_mlp_s": mlp["plain_step_s"],
        "dp_step_digits_cnn_s": cnn["ours_step_s"],
        "dp_step_digits_cnn_b64_s": b64["ours_step_s"],
        "dp_step_mlp_s": mlp["ours_step_s"],
        # The same steps with the noise and Poisson batches from the CSPRNG (deployment).
        "dp_step_ratio_secure_rng_digits_cnn": cnn["secure_rng_ratio"],
        "dp_step_ratio_secure_rng_digits_cnn_b64": b64["secure_rng_ratio"],
        "dp_step_ratio_secure_rng_mlp": mlp["secure_rng_ratio"],
        "secure_rng_vs_fast_step_digits_cnn": cnn["secure_rng_vs_fast"],
        "secure_rng_vs_fast_step_digits_cnn_b64": b64["secure_rng_vs_fast"],
        "secure_rng_vs_fast_step_mlp": mlp["secure_rng_vs_fast"],
        **{f"secure_rng_vs_fast_noise_{k}": v["ratio"] for k, v in noise.items()},
    }
    for name, r in res.items():
        for lever, v in r["levers"].items():
            if "ratio" in v:
                section.keys[f"lever_dp_{lever}_{name}"] = v["ratio"]
    section.rows = [
        Row(
            f"DP-SGD step, digits CNN (batch {cnn['batch']}, as trained)",
            cnn["ours_step_s"] * 1e3,
            cnn["plain_step_s"] * 1e3,
            "ms",
            f"<= {TARGET}x",
            None if quick else cnn["ratio"] <= TARGET,
        ),
        Row(
            "DP-SGD step, digits CNN (batch 64)",
            b64["ours_step_s"] * 1e3,
            b64["plain_step_s"] * 1e3,
            "ms",
            f"<= {TARGET}x",
            None if quick else b64["ratio"] <= TARGET,
        ),
        Row(
            "DP-SGD step, 1M MLP (batch 64)",
            mlp["ours_step_s"] * 1e3,
            mlp["plain_step_s"] * 1e3,
            "ms",
            "",
            None,
        ),
        Row(
            f"  with CSPRNG noise, digits CNN (batch {cnn['batch']})",
            cnn["secure_rng_step_s"] * 1e3,
            cnn["plain_step_s"] * 1e3,
            "ms",
            f"<= {TARGET}x",
            None if quick else cnn["secure_rng_ratio"] <= TARGET,
        ),
        Row(
            "  with CSPRNG noise, digits CNN (batch 64)",
            b64["secure_rng_step_s"] * 1e3,
            b64["plain_step_s"] * 1e3,
            "ms",
            f"<= {TARGET}x",
            None if quick else b64["secure_rng_ratio"] <= TARGET,
        ),
        Row(
            "  with CSPRNG noise, 1M MLP (batch 64)",
            mlp["secure_rng_step_s"] * 1e3,
            mlp["plain_step_s"] * 1e3,
            "ms",
            "",
            None,
        ),
        *(
            Row(
                f"  noise draw, {name} values: CSPRNG vs torch.normal",
                v["secure_s"] * 1e3,
                v["fast_s"] * 1e3,
                "ms",
                "",
                None,
            )
            for name, v in noise.items()
        ),
    ]
    for name in ("digits_cnn", "digits_cnn_b64"):
        for lever, v in res[name]["levers"].items():
            if "ratio" not in v:
                continue
            ok = v.get("same_clipping", True) and v.get("empty_batch", "ok") == "ok"
            section.rows.append(
                Row(
                    f"  lever {lever}, {name}{'' if ok else ' (changes semantics)'}",
                    v["step_s"] * 1e3,
                    v.get("plain_step_s", res[name]["plain_step_s"]) * 1e3,
                    "ms",
                    "",
                    None,
                )
            )
    return section
