"""Measurement 2: plaintext aggregation of 10 x 1M float32 updates.

Ours is :class:`fedvault.coordinator.aggregation.PlainFedAvg` (validation,
sample weights, float32 accumulation, overflow refusal, result cast back to
each tensor's dtype). The baseline is the fastest thing numpy can do with the
same arrays: an *unweighted*, unvalidated, in-place float32 sum
(``acc += u``). Both are single-threaded and timed in thread CPU time
(``bench.common``).
"""

from __future__ import annotations

import numpy as np

from bench.common import Row, Section, make_updates, timed
from fedvault.coordinator.aggregation import PlainFedAvg

__all__ = ["run"]


def run(quick: bool = False) -> Section:
    size = 200_000 if quick else 1_000_000
    repeats = 2 if quick else 9
    updates, weights = make_updates(10, size, seed=1)

    def ours() -> dict[str, np.ndarray]:
        agg = PlainFedAvg()
        for update, weight in zip(updates, weights, strict=True):
            agg.add(update, weight=weight)
        return agg.result()

    def numpy_sum() -> dict[str, np.ndarray]:
        acc = {k: np.zeros_like(v) for k, v in updates[0].items()}
        for update in updates:
            for k, v in update.items():
                acc[k] += v
        return acc

    # Round-robin repeats, so both see the same load on this shared machine.
    base_s = ours_s = float("inf")
    avg: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        seconds, _ = timed(numpy_sum)
        base_s = min(base_s, seconds)
        seconds, avg = timed(ours)
        ours_s = min(ours_s, seconds)
    total = sum(weights)
    expected = {
        k: sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights, strict=True)) / total
        for k in updates[0]
    }
    error = max(float(np.max(np.abs(avg[k] - expected[k]))) for k in expected)
    ratio = ours_s / base_s
    section = Section(name="plain")
    section.keys = {
        "plain_aggregate_ratio": ratio,
        "plain_aggregate_s": ours_s,
        "baseline_plain_numpy_sum_s": base_s,
        "plain_aggregate_max_abs_error": error,
    }
    section.rows = [
        Row(
            "plain aggregate 10 x 1M vs numpy in-place sum",
            ours_s,
            base_s,
            "s",
            "<= 2x",
            None if quick else ratio <= 2.0,  # quick's 200k updates sit in cache: another regime
        ),
    ]
    return section
