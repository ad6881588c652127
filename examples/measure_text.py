"""Measure the text tasks under DP-SGD: LoRA (``text-lora``) vs a frozen encoder's head.

A stand-alone emulation of a fedvault job for tasks that share only their
trainable parameters (``Task.shared == "trainable"``), like
``examples/measure.py`` but averaging the shared tensors alone:

1. ``task.load_data(seed)`` gives ``(train, test)``; the training part is
   split iid among the hospitals (``fedvault.partition``, seeded by ``seed``).
2. Each hospital plans DP-SGD for the whole job with
   :func:`fedvault.privacy.dp.plan_dp` (PRV accountant; the noise multiplier
   that spends ε over every round) and keeps its accountant across rounds.
3. Each round every hospital loads the global *shared* tensors into its own
   copy of the model (the frozen rest is what ``build_model`` loaded) and
   trains with :func:`fedvault.privacy.dp.make_private` (Poisson sampling,
   per-sample clipping, Gaussian noise, SGD); the coordinator takes the
   sample-weighted mean of the shared tensors only.
4. The final global model is evaluated on the test part: accuracy and AUROC.

Both tasks run on the same split, partition, seed and ε. The table gives the
trainable weights, the bytes of one hospital's shared update per round in
float32 (what is encrypted and sent), seconds per round (all hospitals, one
after another, on this machine) and the test metrics. ``--reference`` adds
non-private, centralised references that show how hard the data is: logistic
regression on word unigram and bigram counts, and on the frozen encoder's
mean-pooled embeddings.

Examples::

    python examples/measure_text.py                       # both tasks, seed 0, epsilon 8
    python examples/measure_text.py --tasks text-lora --rounds 4 --lr 1.5 --verbose
    python examples/measure_text.py --reference --tasks ""
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers loads: nothing is downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fedvault.client.training import LocalResult, train_private
from fedvault.config import TrainingConfig
from fedvault.partition import Partition, partition_indices
from fedvault.privacy.dp import AccountantState, DpPlan, PrivacyConfig, plan_dp
from fedvault.task import Task, TrainingDefaults
from fedvault.task_registry import load_task

__all__ = ["emulate", "evaluate", "main", "references"]


@torch.no_grad()
def evaluate(model: nn.Module, test: Dataset[Any]) -> dict[str, float]:
    """Accuracy and AUROC of a binary classifier on ``test``."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    model.eval()
    scores, targets = [], []
    for ids, labels in DataLoader(test, batch_size=256):
        scores.append(model(ids).softmax(dim=1)[:, 1].double())
        targets.append(labels)
    p, y = torch.cat(scores).numpy(), torch.cat(targets).numpy()
    return {"accuracy": float(accuracy_score(y, p > 0.5)), "auroc": float(roc_auc_score(y, p))}


def _training_config(defaults: TrainingDefaults) -> TrainingConfig:
    """The local training settings of every hospital, from the task's defaults."""
    return TrainingConfig(
        batch_size=defaults.batch_size,
        learning_rate=defaults.learning_rate,
        local_epochs=defaults.local_epochs,
        momentum=defaults.momentum,
        optimizer=defaults.optimizer,
    )


def _dp_plans(
    sizes: Sequence[int],
    batches: Sequence[int],
    *,
    epsilon: float,
    delta: float,
    defaults: TrainingDefaults,
    rounds: int,
) -> list[DpPlan]:
    """Each hospital's DP-SGD plan for the whole job (the noise that spends ε)."""
    privacy = PrivacyConfig(epsilon=epsilon, delta=delta, max_grad_norm=defaults.max_grad_norm)
    return [
        plan_dp(
            privacy, num_samples=n, batch_size=b, local_epochs=defaults.local_epochs, rounds=rounds
        )
        for n, b in zip(sizes, batches, strict=True)
    ]


def _local_update(
    task: Task,
    global_model: nn.Module,
    data: Dataset[Any],
    names: Sequence[str],
    *,
    training: TrainingConfig,
    max_grad_norm: float,
    batch_size: int,
    plan: DpPlan,
    state: AccountantState,
    seed: int,
) -> tuple[dict[str, torch.Tensor], LocalResult]:
    """One hospital's round of local DP-SGD on a copy of the global model.

    Returns its shared tensors after training, and the training result (loss,
    accountant state).
    """
    model = copy.deepcopy(global_model)
    # The hospital's own training step, as a deployed client runs it.
    local = train_private(
        model,
        data,
        task=task,
        training=training,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        plan=plan,
        state=state,
        device=torch.device("cpu"),
        seed=seed,
        secure_rng=False,  # seeded noise, as `fedvault simulate` draws it by default
    )
    trained = model.state_dict()
    return {k: trained[k].detach().clone() for k in names}, local


def _weighted_mean(
    updates: Sequence[dict[str, torch.Tensor]], sizes: Sequence[int], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of the hospitals' shared tensors (in float64, then float32)."""
    weights = [n / sum(sizes) for n in sizes]
    # cast: a sum over at least one hospital's tensor is a tensor, never the start value 0.
    return {
        k: cast(
            torch.Tensor, sum(w * u[k].double() for w, u in zip(weights, updates, strict=True))
        ).float()
        for k in names
    }


def _print_round(
    name: str, round_: int, losses: Sequence[float], metrics: dict[str, float], start: float
) -> None:
    """One progress line: the round's mean local loss and the global model's test metrics."""
    shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    print(
        f"    {name} round {round_}: local loss {np.mean(losses):.4f}  {shown}  "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )


def emulate(
    task: Task,
    seed: int,
    *,
    hospitals: int,
    rounds: int,
    epsilon: float,
    delta: float,
    defaults: TrainingDefaults,
    verbose: bool = False,
) -> dict[str, float]:
    """One emulated job of ``task``; returns sizes, timing, ε spent and test metrics."""
    assert task.load_data is not None
    train, test = task.load_data(seed)
    shards = partition_indices(
        np.zeros(len(train), dtype=np.int64),  # type: ignore[arg-type]  # TensorDataset is sized
        hospitals,
        Partition("iid"),
        seed=seed,
    )
    torch.manual_seed(seed)  # LoRA and head initialisation, then sampling and noise
    global_model = task.build_model()
    names = task.shared_names(global_model)
    state = global_model.state_dict()
    shared_bytes = sum(state[k].numel() for k in names) * 4  # float32 on the wire
    trainable = sum(p.numel() for p in global_model.parameters() if p.requires_grad)
    sizes = [len(s) for s in shards]
    batches = [min(defaults.batch_size, n) for n in sizes]
    plans = _dp_plans(
        sizes, batches, epsilon=epsilon, delta=delta, defaults=defaults, rounds=rounds
    )
    accountants = [AccountantState("prv") for _ in shards]
    training = _training_config(defaults)
    start = time.perf_counter()
    for round_ in range(1, rounds + 1):
        updates, losses = [], []
        for h, shard in enumerate(shards):
            update, local = _local_update(
                task,
                global_model,
                Subset(train, shard.tolist()),
                names,
                training=training,
                max_grad_norm=defaults.max_grad_norm,
                batch_size=batches[h],
                plan=plans[h],
                state=accountants[h],
                seed=seed * 1_000_003 + round_ * 1_009 + h,
            )
            accountants[h] = local.state
            losses.append(local.loss)
            updates.append(update)
        global_model.load_state_dict(_weighted_mean(updates, sizes, names), strict=False)
        if verbose:
            _print_round(task.name, round_, losses, evaluate(global_model, test), start)
    seconds = (time.perf_counter() - start) / rounds
    return {
        "trainable": trainable,
        "shared_bytes": shared_bytes,
        "seconds_per_round": seconds,
        "epsilon": max(a.epsilon(delta) for a in accountants),
        "noise_multiplier": max(p.noise_multiplier for p in plans),
        **evaluate(global_model, test),
    }


def references(seed: int) -> dict[str, float]:
    """Non-private, centralised accuracy of logistic regression on three representations."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    from fedvault.examples import text_lora

    texts, labels = text_lora.load_texts(seed)
    n = text_lora.NUM_TRAIN
    out = {}
    for name, ngrams in (("bow_unigram", (1, 1)), ("bow_bigram", (1, 2))):
        vectorizer = CountVectorizer(ngram_range=ngrams).fit(texts[:n])
        x = vectorizer.transform(texts)
        fit = LogisticRegression(max_iter=5000).fit(x[:n], labels[:n])
        out[name] = float(fit.score(x[n:], labels[n:]))
    model = text_lora.build_frozen_baseline().eval()
    encoder: Any = model.encoder  # a transformers BertModel
    ids = text_lora.tokenize(texts)
    with torch.no_grad():
        pooled = []
        for batch in ids.split(256):
            mask = (batch != text_lora.PAD_ID).unsqueeze(-1).float()
            hidden = encoder(input_ids=batch, attention_mask=mask[..., 0].long())
            pooled.append((hidden.last_hidden_state * mask).sum(1) / mask.sum(1))
    x = torch.cat(pooled).numpy()
    best = max(
        LogisticRegression(C=c, max_iter=5000).fit(x[:n], labels[:n]).score(x[n:], labels[n:])
        for c in (0.1, 1.0, 10.0, 100.0)
    )
    out["frozen_probe_best_C"] = float(best)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse the command line, run each task on each seed, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks",
        default="text-lora,text-frozen-head",
        help="comma-separated installed task names (default: both text tasks)",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    tuning = parser.add_argument_group("override every task's training defaults")
    tuning.add_argument("--batch-size", type=int)
    tuning.add_argument("--learning-rate", "--lr", type=float)
    tuning.add_argument("--local-epochs", type=int)
    tuning.add_argument("--max-grad-norm", type=float)
    tuning.add_argument("--momentum", type=float)
    tuning.add_argument("--optimizer", choices=["sgd", "adam"])
    parser.add_argument("--reference", action="store_true", help="non-private references too")
    parser.add_argument("--verbose", action="store_true", help="test metrics after every round")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    overrides = {
        k: getattr(args, k)
        for k in (
            "batch_size",
            "learning_rate",
            "local_epochs",
            "max_grad_norm",
            "momentum",
            "optimizer",
        )
        if getattr(args, k) is not None
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    for name in filter(None, (t.strip() for t in args.tasks.split(","))):
        task = load_task(name).task
        defaults = replace(task.defaults, **overrides)
        print(
            f"{task.name}: {args.hospitals} hospitals x {args.rounds} rounds, epsilon "
            f"{args.epsilon:g}, delta {args.delta:g}; {defaults}",
            flush=True,
        )
        for seed in seeds:
            result = emulate(
                task,
                seed,
                hospitals=args.hospitals,
                rounds=args.rounds,
                epsilon=args.epsilon,
                delta=args.delta,
                defaults=defaults,
                verbose=args.verbose,
            )
            rows.append({"task": task.name, "seed": seed, **result})
            print(f"  seed {seed}: {result}", flush=True)
    if rows:
        header = (
            f"{'task':18s} {'seed':>4s} {'trainable':>10s} {'update bytes':>13s} "
            f"{'s/round':>8s} {'epsilon':>8s} {'sigma':>6s} {'accuracy':>9s} {'auroc':>6s}"
        )
        print("\n" + header + "\n" + "-" * len(header))
        for r in rows:
            print(
                f"{r['task']:18s} {r['seed']:4d} {r['trainable']:10,d} {r['shared_bytes']:13,d} "
                f"{r['seconds_per_round']:8.1f} {r['epsilon']:8.2f} {r['noise_multiplier']:6.2f} "
                f"{r['accuracy']:9.3f} {r['auroc']:6.3f}"
            )
    if args.reference:
        for seed in seeds:
            shown = "  ".join(f"{k} {v:.3f}" for k, v in references(seed).items())
            print(f"non-private centralised reference, seed {seed}: {shown}", flush=True)
    return rows


if __name__ == "__main__":
    main()
