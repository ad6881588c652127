"""Lay out the compose demo's hospital data, as ``fedvault demo`` does on loopback.

``python /opt/fedvault/deploy/demo_data.py CONSORTIUM.toml OUT`` splits
scikit-learn's bundled breast-cancer data (i.i.d., seeded) among the consortium's
hospitals and writes, for each, ``OUT/NAME/`` with ``train.csv``, ``test.csv``, the
data spec ``data.toml`` and the site policy ``policy.toml`` allowing the
breast-cancer task (``fedvault.app.demo.write_hospital_data``). A hospital whose
``data.toml`` already exists is left as it is, so the one-shot service can run at
every ``docker compose up``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedvault.app.demo import write_hospital_data
from fedvault.app.provision import load_consortium
from fedvault.errors import FedvaultError
from fedvault.partition import Partition, partition_indices
from fedvault.task_registry import load_task


def write_demo_data(consortium: Path, out: Path, *, seed: int = 0, epsilon: float = 3.0) -> int:
    """Write every hospital's share under ``out``; returns how many were written now."""
    names = list(load_consortium(consortium).hospitals)
    load_data = load_task("breast-cancer").task.load_data
    assert load_data is not None  # the built-in task ships its reference data
    train, test = load_data(seed)
    x_train, y_train = (t.numpy() for t in train.tensors)  # type: ignore[attr-defined]
    x_test, y_test = (t.numpy() for t in test.tensors)  # type: ignore[attr-defined]
    iid = Partition(kind="iid")
    train_parts = partition_indices(y_train, len(names), iid, seed=seed)
    test_parts = partition_indices(y_test, len(names), iid, seed=seed, min_size=1)
    written = 0
    for name, tr, te in zip(names, train_parts, test_parts, strict=True):
        if (out / name / "data.toml").exists():
            print(f"{name}: data already in {out / name}")
            continue
        spec = write_hospital_data(
            out / name, (x_train[tr], y_train[tr]), (x_test[te], y_test[te]), epsilon=epsilon
        )
        print(f"{name}: {len(tr)} training and {len(te)} test records, spec {spec}")
        written += 1
    return written


def main(argv: list[str]) -> int:
    """Command line: ``CONSORTIUM OUT [--seed S] [--epsilon E]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("consortium", type=Path, help="the consortium TOML (hospital names)")
    parser.add_argument("out", type=Path, help="directory for one folder per hospital")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split")
    parser.add_argument("--epsilon", type=float, default=3.0, help="the policy's ε cap per job")
    args = parser.parse_args(argv)
    try:
        write_demo_data(args.consortium, args.out, seed=args.seed, epsilon=args.epsilon)
    except FedvaultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
