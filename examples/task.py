"""Running a task from the command line: what each example's ``__main__`` block calls.

The examples show the researcher's Python API (:func:`fedvault.simulation.simulate`)
rather than shelling out to ``fedvault simulate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedvault.task import Task

__all__ = ["run_cli"]


def run_cli(
    task: Task, argv: Sequence[str] | None = None, *, hospitals: int, rounds: int
) -> dict[str, Any]:
    """Run ``task`` as a simulated consortium from the command line.

    Returns
    -------
    dict
        The simulation report (also written to ``OUT/report.json``).
    """
    # Imported here so a task definition loads without the simulation stack.
    from fedvault.config import JobConfig
    from fedvault.simulation import simulate

    parser = argparse.ArgumentParser(
        prog=f"python -m fedvault.examples.{task.name.replace('-', '_')}",
        description=f"Simulate a consortium training {task.description or task.name}.",
    )
    parser.add_argument("--hospitals", type=int, default=hospitals)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA")
    parser.add_argument("--secure-aggregation", choices=("he", "none"), default="he")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs") / task.name)
    args = parser.parse_args(argv)
    config = JobConfig.for_task(
        task,
        hospitals=args.hospitals,
        rounds=args.rounds,
        epsilon=args.epsilon,
        delta=args.delta,
        partition=args.partition,
        secure_aggregation=args.secure_aggregation,
        seed=args.seed,
    )
    report: dict[str, Any] = simulate(config, task=task, out_dir=args.out)
    final = report["final"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(final.get("metrics", {}).items()))
    print(
        f"{task.name}: {shown} at epsilon {final['epsilon_max']:.2f} "
        f"(delta {final['delta']:g}); report and model in {args.out}"
    )
    return report
