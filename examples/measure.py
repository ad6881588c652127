"""Measure a task under DP-SGD with a stand-alone emulation of a federated job.

What ``examples/README.md`` reports under "Measured accuracy" comes from this
script. It emulates the arithmetic of a fedvault job without Flower, the
coordinator or encryption (none of them changes the model, beyond the
fixed-point rounding of encrypted aggregation):

1. ``task.load_data(seed)`` gives ``(train, test)``; the training part is
   split iid among the hospitals (``fedvault.partition``, seeded by ``seed``).
2. Each hospital plans its DP-SGD for the whole job with
   :func:`fedvault.privacy.dp.plan_dp` (PRV accountant, the noise multiplier
   that spends ε over every round) and keeps its accountant state across
   rounds.
3. Each round every hospital trains a copy of the global model with
   :func:`fedvault.privacy.dp.make_private` (Poisson sampling, per-sample
   clipping, Gaussian noise; plain SGD with the task's loss), then the
   coordinator takes the sample-weighted mean of the hospitals' weights.
4. The final global model is evaluated on the test part with scikit-learn:
   accuracy, balanced accuracy and AUROC (one-vs-rest for several classes)
   for classification; MAE, RMSE and R² for regression.

A non-private centralised reference is fitted on the whole training part:
logistic regression on the flattened features for classification, least
squares for regression (``--model-reference`` also trains the task's own
model centrally, without DP, with Adam).

Examples::

    python examples/measure.py --task diabetes --seeds 0-7
    python examples/measure.py --task imaging --seeds 0-3 --rounds 10 --hospitals 3
    PYTHONPATH=examples/task-package python examples/measure.py --task oncology_task:TASK

``--task`` takes an installed task's name (entry point of ``fedvault.tasks``)
or ``module:attribute``. A seed fixes the split, the partition, the model's
initialisation and the DP noise; ``--noise-draws K`` repeats each seed with K
noise draws (initialisation and noise) on the same split.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fedvault.partition import Partition, partition_indices
from fedvault.privacy.dp import AccountantState, PrivacyConfig, make_private, plan_dp
from fedvault.task import Task, TrainingDefaults
from fedvault.task_registry import load_task

__all__ = ["emulate_job", "evaluate", "main", "parse_seeds", "reference"]


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    seeds: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last) + 1) if sep else [int(first)])
    return seeds


def _features_targets(data: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``data`` stacked: ``(features, targets)``."""
    items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
    x = torch.stack([torch.as_tensor(f) for f, _ in items])
    y = torch.as_tensor(np.array([float(t) for _, t in items]))
    return x, y


def evaluate(task: Task, model: nn.Module, test: Dataset[Any]) -> dict[str, float]:
    """The task's metrics of ``model`` on ``test`` (scikit-learn's implementations)."""
    from sklearn import metrics

    x, y = _features_targets(test)
    model.eval()
    with torch.no_grad():
        scores = torch.cat([task.scores(model(b)) for b in x.split(1024)]).double().numpy()
    if task.is_classification:
        return _classification_metrics(y.long().numpy(), scores)
    out = _regression_metrics(y.numpy(), scores)
    std = getattr(test, "target_std", None)
    if std is not None:  # the task scales its target: also report original units
        out["mae_units"] = out["mae"] * float(std)
        out["rmse_units"] = out["rmse"] * float(std)
    out["r2_mean_predictor"] = float(metrics.r2_score(y.numpy(), np.zeros(len(y))))
    return out


def _classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from sklearn import metrics

    probs = probs / probs.sum(axis=1, keepdims=True)
    classes = probs.shape[1]
    if classes == 2:
        auroc = metrics.roc_auc_score(y, probs[:, 1])
    else:
        auroc = metrics.roc_auc_score(y, probs, multi_class="ovr", labels=list(range(classes)))
    pred = probs.argmax(axis=1)
    return {
        "accuracy": float(metrics.accuracy_score(y, pred)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y, pred)),
        "auroc": float(auroc),
    }


def _regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn import metrics

    return {
        "mae": float(metrics.mean_absolute_error(y, pred)),
        "rmse": float(math.sqrt(metrics.mean_squared_error(y, pred))),
        "r2": float(metrics.r2_score(y, pred)),
    }


def _local_round(
    global_model: nn.Module,
    data: Dataset[Any],
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    defaults: TrainingDefaults,
    batch_size: int,
    noise_multiplier: float,
    state: AccountantState,
) -> tuple[dict[str, torch.Tensor], float, AccountantState]:
    """One hospital's local DP-SGD on a copy of the global model.

    Returns its weights, its mean local loss and its accountant state after the round.
    """
    model = copy.deepcopy(global_model).train()
    loader = DataLoader(data, batch_size=batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=defaults.learning_rate, momentum=defaults.momentum
    )
    private = make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=defaults.max_grad_norm,
        state=state,
        secure_rng=False,  # seeded noise: a seed fixes the run (see the module docstring)
    )
    total, seen = 0.0, 0
    for _ in range(defaults.local_epochs):
        for features, targets in private.data_loader:
            private.optimizer.zero_grad(set_to_none=True)
            outputs = private.module(features)
            # An empty Poisson batch still takes its (noise-only) step.
            loss = criterion(outputs, targets) if len(targets) else outputs.sum() * 0.0
            loss.backward()
            private.optimizer.step()
            total += float(loss.detach()) * len(targets)
            seen += len(targets)
    update = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Per-sample gradients take batch x weights floats: free them before the next copy.
    private.optimizer.zero_grad(set_to_none=True)
    return update, total / max(seen, 1), private.state()


def _fedavg(
    updates: Sequence[dict[str, torch.Tensor]], sizes: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of the hospitals' weights (in float64, then their dtype)."""
    weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    averaged = {
        k: sum(float(w) * u[k].double() for w, u in zip(weights, updates, strict=True))
        for k in updates[0]
    }
    return {k: v.to(updates[0][k].dtype) for k, v in averaged.items()}  # type: ignore[union-attr]


def emulate_job(
    task: Task,
    seed: int,
    *,
    hospitals: int,
    rounds: int,
    epsilon: float,
    delta: float,
    defaults: TrainingDefaults,
    noise_draw: int = 0,
    verbose: bool = False,
) -> dict[str, Any]:
    """One emulated job: DP-SGD at every hospital, FedAvg, final test metrics."""
    if task.load_data is None:
        raise SystemExit(f"task {task.name!r} has no load_data: it cannot be emulated")
    train, test = task.load_data(seed)
    shards = partition_indices(
        np.zeros(len(train), dtype=np.int64),  # type: ignore[arg-type]
        hospitals,
        Partition("iid"),
        seed=seed,
    )
    torch.manual_seed(seed * 1000 + noise_draw)  # initialisation, sampling and noise
    global_model = task.build_model()
    sizes = [len(s) for s in shards]
    privacy = PrivacyConfig(epsilon=epsilon, delta=delta, max_grad_norm=defaults.max_grad_norm)
    batches = [min(defaults.batch_size, n) for n in sizes]
    plans = [
        plan_dp(
            privacy, num_samples=n, batch_size=b, local_epochs=defaults.local_epochs, rounds=rounds
        )
        for n, b in zip(sizes, batches, strict=True)
    ]
    states = [AccountantState("prv") for _ in shards]
    criterion = task.criterion()
    start = time.perf_counter()
    for round_ in range(1, rounds + 1):
        updates, losses = [], []
        for h, shard in enumerate(shards):
            update, loss, states[h] = _local_round(
                global_model,
                Subset(train, shard.tolist()),
                criterion,
                defaults=defaults,
                batch_size=batches[h],
                noise_multiplier=plans[h].noise_multiplier,
                state=states[h],
            )
            losses.append(loss)
            updates.append(update)
        global_model.load_state_dict(_fedavg(updates, sizes))
        if verbose:
            shown = _fmt(evaluate(task, global_model, test))
            print(
                f"    round {round_:2d}: local loss {np.mean(losses):.4f}  {shown}  "
                f"({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    result = evaluate(task, global_model, test)
    result["epsilon"] = max(s.epsilon(delta) for s in states)
    result["noise_multiplier"] = max(p.noise_multiplier for p in plans)
    result["seconds_per_round"] = (time.perf_counter() - start) / rounds
    return result


def reference(task: Task, seed: int, *, model_epochs: int = 0) -> dict[str, float]:
    """Non-private, centralised: a scikit-learn linear model (and the task's model, if asked)."""
    from sklearn.linear_model import LinearRegression, LogisticRegression

    assert task.load_data is not None
    train, test = task.load_data(seed)
    x_train, y_train = _features_targets(train)
    x_test, y_test = _features_targets(test)
    flat_train = x_train.reshape(len(x_train), -1).double().numpy()
    flat_test = x_test.reshape(len(x_test), -1).double().numpy()
    if task.is_classification:
        linear = LogisticRegression(max_iter=5000).fit(flat_train, y_train.long().numpy())
        out = _classification_metrics(y_test.long().numpy(), linear.predict_proba(flat_test))
    else:
        fit = LinearRegression().fit(flat_train, y_train.numpy())
        out = _regression_metrics(y_test.numpy(), fit.predict(flat_test))
    out = {f"sklearn_{k}": v for k, v in out.items()}
    if model_epochs:
        torch.manual_seed(seed)
        model = task.build_model().train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        criterion = task.criterion()
        targets = y_train.long() if task.is_classification else y_train.float()
        for _ in range(model_epochs):
            for idx in torch.randperm(len(x_train)).split(64):
                optimizer.zero_grad()
                criterion(model(x_train[idx]), targets[idx]).backward()
                optimizer.step()
        out |= {f"model_{k}": v for k, v in evaluate(task, model, test).items()}
    return out


def _fmt(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in values.items())


def _summary(name: str, runs: list[dict[str, float]]) -> None:
    print(f"{name} ({len(runs)} runs): mean [min - max]")
    for key in runs[0]:
        values = np.array([r[key] for r in runs])
        print(f"  {key:26s} {values.mean():8.3f}  [{values.min():.3f} - {values.max():.3f}]")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run every seed, print each run and a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="installed task name or module:attribute")
    parser.add_argument("--seeds", default="0", help="e.g. 0-7 or 0,3,5 (default 0)")
    parser.add_argument("--noise-draws", type=int, default=1, help="noise draws per seed")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    tuning = parser.add_argument_group("override the task's training defaults")
    tuning.add_argument("--batch-size", type=int)
    tuning.add_argument("--learning-rate", "--lr", type=float)
    tuning.add_argument("--local-epochs", type=int)
    tuning.add_argument("--max-grad-norm", type=float)
    tuning.add_argument("--momentum", type=float)
    parser.add_argument(
        "--model-reference",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also train the task's model centrally without DP (Adam) for EPOCHS epochs",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the references")
    parser.add_argument("--verbose", action="store_true", help="metrics after every round")
    args = parser.parse_args(argv)
    # Opacus' reminders (secure RNG off, hooks on a first layer) would bury the numbers.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    task = load_task(args.task).task
    overrides = {
        k: getattr(args, k)
        for k in ("batch_size", "learning_rate", "local_epochs", "max_grad_norm", "momentum")
        if getattr(args, k) is not None
    }
    defaults = replace(task.defaults, **overrides)
    print(
        f"{task.name} ({task.kind}): {args.hospitals} hospitals x {args.rounds} rounds, "
        f"epsilon {args.epsilon:g}, delta {args.delta:g}; {defaults}",
        flush=True,
    )
    runs, references = [], []
    for seed in parse_seeds(args.seeds):
        for draw in range(args.noise_draws):
            result = emulate_job(
                task,
                seed,
                hospitals=args.hospitals,
                rounds=args.rounds,
                epsilon=args.epsilon,
                delta=args.delta,
                defaults=defaults,
                noise_draw=draw,
                verbose=args.verbose,
            )
            print(f"  seed {seed} draw {draw}: {_fmt(result)}", flush=True)
            runs.append(result)
        if not args.no_reference:
            ref = reference(task, seed, model_epochs=args.model_reference)
            print(f"  seed {seed} non-private reference: {_fmt(ref)}", flush=True)
            references.append(ref)
    _summary("DP federated", runs)
    if references:
        _summary("non-private centralised reference", references)
    return {"runs": runs, "references": references}


if __name__ == "__main__":
    main()
