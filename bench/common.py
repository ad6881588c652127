"""Timing helpers and the result rows every measurement module returns.

Benchmarks here compare *ratios against baselines measured in the same run on
the same machine*, so a slow or busy machine moves both sides together. Each
timing is the minimum over a few repeats (the standard for micro-benchmarks:
the minimum is the run least disturbed by other processes), except where a
whole job is timed once.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["Row", "Section", "best_of", "timed"]

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One line of the result table.

    ``ours`` and ``baseline`` are in ``unit``; ``ratio`` is ours / baseline
    (or baseline / ours for "higher is better" metrics, see ``higher_is_better``).
    ``target`` is a human-readable bound and ``passed`` whether it is met
    (``None`` for informational rows).
    """

    metric: str
    ours: float | None
    baseline: float | None = None
    unit: str = ""
    target: str = ""
    passed: bool | None = None
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.baseline is None or self.ours == 0 or self.baseline == 0:
            return None
        return self.ours / self.baseline


@dataclass
class Section:
    """What one measurement module produced: table rows and JSON keys."""

    name: str
    rows: list[Row] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Run ``fn`` once; (seconds, result). Garbage is collected first, not during."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    finally:
        if enabled:
            gc.enable()


def best_of(fn: Callable[[], T], repeats: int = 3) -> tuple[float, T]:
    """Minimum wall time of ``repeats`` runs of ``fn`` and the last result."""
    best, out = timed(fn)
    for _ in range(repeats - 1):
        seconds, out = timed(fn)
        best = min(best, seconds)
    return best, out
