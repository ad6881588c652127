"""Timing helpers and the result rows every measurement module returns.

Benchmarks here compare *ratios against baselines measured in the same run on
the same machine*, so a slow or busy machine moves both sides together. Each
timing is the minimum over a few repeats (the standard for micro-benchmarks:
the minimum is the run least disturbed by other processes), except where a
whole job is timed once.

Single-threaded measurements time the calling thread's CPU time
(:data:`cpu_clock`), not wall time: on a shared machine (the development one
has 2 cores and often a load average above 10), wall time mostly measures how
long the thread waited for a core, and no number of repeats filters that out
when the load is steady. CPU time still includes the cache and memory
contention other processes cause, so ratios stay the useful output. Anything
that runs work on other threads or processes (two torch threads, simulations)
is timed in wall time.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = ["Row", "Section", "best_of", "cpu_clock", "make_updates", "timed"]

#: The calling thread's CPU time (see the module docstring).
cpu_clock = time.thread_time

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


def timed(fn: Callable[[], T], clock: Callable[[], float] = cpu_clock) -> tuple[float, T]:
    """Run ``fn`` once; (seconds of ``clock``, result). Garbage is collected first, not during."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        out = fn()
        return clock() - start, out
    finally:
        if enabled:
            gc.enable()


def best_of(
    fn: Callable[[], T], repeats: int = 3, clock: Callable[[], float] = cpu_clock
) -> tuple[float, T]:
    """Minimum time of ``repeats`` runs of ``fn`` and the last result."""
    best, out = timed(fn, clock)
    for _ in range(repeats - 1):
        seconds, out = timed(fn, clock)
        best = min(best, seconds)
    return best, out


def make_updates(
    count: int, size: int, seed: int = 0
) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """``count`` float32 models of ``size`` parameters (a weight matrix and a bias).

    Shared by the plaintext and encrypted aggregation measurements so both
    aggregate the same updates; the weights are sample counts.
    """
    rng = np.random.default_rng(seed)
    rows = 1000 if size >= 10_000 else 10
    cols = (size - rows) // rows
    bias = size - rows * cols
    updates = [
        {
            "fc.weight": (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32),
            "fc.bias": (rng.standard_normal(bias) * 0.05).astype(np.float32),
        }
        for _ in range(count)
    ]
    weights = [float(100 + 37 * k) for k in range(count)]
    return updates, weights


@dataclass(frozen=True)
class ChildRun:
    """How a child measurement process ended (see :func:`run_child`)."""

    returncode: int | None  # None: killed at the time limit
    stdout: str
    stderr: str
    wall_s: float

    def last_json(self) -> dict[str, Any]:
        """The JSON object a child prints as its last line of output."""
        out: dict[str, Any] = json.loads(self.stdout.strip().splitlines()[-1])
        return out


def run_child(module: str, args: list[str], timeout_s: float) -> ChildRun:
    """Run ``python -m module *args`` in its own process group, killed whole at ``timeout_s``.

    A fresh process per configuration lets Ray start and stop cleanly; the group
    takes Ray's processes with it on a hang (seen under heavy load: the raylet
    died and the simulation waited forever).
    """
    root = str(Path(__file__).resolve().parents[1])  # for Ray's workers, after the caller's
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), root) if p)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, nothing else
        stdout, stderr = proc.communicate()
        return ChildRun(None, stdout, stderr, time.perf_counter() - start)
    return ChildRun(proc.returncode, stdout, stderr, time.perf_counter() - start)
