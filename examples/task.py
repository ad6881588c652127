"""What a federated task is: a model factory, a data set and training defaults.

The simulation runner and the hospital agent need only these few things from a
researcher, so plugging in a new model is writing one :class:`Example`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads with a task's model and data, not with its defaults
    from torch import nn
    from torch.utils.data import Dataset

__all__ = ["Example", "TrainingDefaults", "run_cli"]


@dataclass(frozen=True, kw_only=True)
class TrainingDefaults:
    """Local DP-SGD hyper-parameters that suit a task.

    They were tuned by experiment for the target budget (ε = 3, δ = 1e-5 over
    the whole job): DP-SGD wants fewer, larger, clipped steps than plain SGD,
    so values that are good without privacy are usually bad with it.

    Parameters
    ----------
    batch_size
        Expected Poisson batch size; the sample rate is ``batch_size / n``.
    learning_rate
        SGD step size.
    local_epochs
        Passes over the local data per round.
    max_grad_norm
        Per-sample clipping bound C of DP-SGD (Abadi et al., 2016).
    momentum
        SGD momentum.
    """

    batch_size: int
    learning_rate: float
    local_epochs: int = 1
    max_grad_norm: float = 1.0
    momentum: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Example:
    """A federated task: a model factory and a data set. Researchers plug in their own.

    The task is classification: the model maps a batch of inputs to
    ``num_classes`` logits, trained with cross-entropy and scored by argmax
    accuracy.

    Parameters
    ----------
    name
        Identifier, as given to ``--example``.
    build_model
        Returns a fresh, untrained model. It must be Opacus-compatible: no
        BatchNorm (it mixes samples, which breaks per-sample clipping); use
        GroupNorm or no normalisation.
    load_data
        ``seed -> (train, test)``: the full split, before it is partitioned
        among hospitals. Items are ``(features, label)`` pairs.
    num_classes
        Number of output logits.
    defaults
        Training hyper-parameters tuned for this task.
    description
        One line for listings.
    """

    name: str
    build_model: Callable[[], nn.Module]
    load_data: Callable[[int], tuple[Dataset[Any], Dataset[Any]]]
    num_classes: int
    defaults: TrainingDefaults
    description: str = ""

    def labels(self, dataset: Dataset[Any]) -> np.ndarray:
        """Return the labels of ``dataset`` as an ``int64`` array.

        Partitioning needs every label; reading them from the tensor (or a
        ``targets`` attribute) avoids loading every sample. Any other data set
        is iterated once, taking the second element of each item.
        """
        return _labels(dataset)


def _labels(dataset: Dataset[Any]) -> np.ndarray:
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, TensorDataset):
        return _as_int64(dataset.tensors[-1])
    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _as_int64(targets)
    n = len(dataset)  # type: ignore[arg-type]
    return np.array([int(dataset[i][1]) for i in range(n)], dtype=np.int64)


def _as_int64(values: Any) -> np.ndarray:
    from torch import Tensor

    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1).astype(np.int64)


def run_cli(
    example: Example, argv: Sequence[str] | None = None, *, hospitals: int, rounds: int
) -> dict[str, Any]:
    """Run ``example`` as a simulated consortium from the command line.

    The ``__main__`` block of each example calls this, so the examples show
    the researcher's Python API (:func:`fedvault.simulation.simulate`) rather
    than shelling out to ``fedvault simulate``.

    Returns
    -------
    dict
        The simulation report (also written to ``OUT/report.json``).
    """
    # Imported here so a task definition loads without the simulation stack.
    from fedvault.config import JobConfig
    from fedvault.simulation import simulate

    parser = argparse.ArgumentParser(
        prog=f"python -m fedvault.examples.{example.name.replace('-', '_')}",
        description=f"Simulate a consortium training {example.description or example.name}.",
    )
    parser.add_argument("--hospitals", type=int, default=hospitals)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA")
    parser.add_argument("--secure-aggregation", choices=("he", "none"), default="he")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs") / example.name)
    args = parser.parse_args(argv)
    config = JobConfig.for_example(
        example,
        hospitals=args.hospitals,
        rounds=args.rounds,
        epsilon=args.epsilon,
        delta=args.delta,
        partition=args.partition,
        secure_aggregation=args.secure_aggregation,
        seed=args.seed,
    )
    report: dict[str, Any] = simulate(config, example=example, out_dir=args.out)
    final = report["final"]
    print(
        f"{example.name}: accuracy {final['accuracy']:.3f} at epsilon "
        f"{final['epsilon_max']:.2f} (delta {final['delta']:g}); report in {args.out}"
    )
    return report
