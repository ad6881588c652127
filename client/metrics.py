"""Prometheus metrics of a hospital (``fedvault client start --metrics-port``).

Two sources, one ``/metrics`` endpoint served by the daemon:

* **The hospital's own records, read at scrape time** (:class:`LedgerCollector`):
  its privacy ledger (training runs and ε per job, the same numbers the budget
  check uses), each job's budget (``--epsilon-budget``, else the job's ε from
  the job configuration archived with its models) and the device it trains on.
* **What only the ClientApp processes see** (:func:`timed`,
  :func:`count_refusal`): Flower runs each ClientApp message in its own process
  (``flwr-clientapp``, started by the SuperNode's SuperExec), so training,
  encryption and decryption times and refusals go through prometheus_client's
  multiprocess mode: the daemon empties a directory and names it in
  ``PROMETHEUS_MULTIPROC_DIR`` before the SuperNode starts, the app processes
  inherit it, and the daemon merges their files. Without the variable
  (``fedvault simulate``, metrics off) these calls do nothing.

Nothing derived from the model, the data or its evaluation is exported: no
loss, accuracy, weights or record values.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Literal

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from fedvault.errors import FedvaultError
from fedvault.metrics_endpoint import MULTIPROC_ENV, MetricsEndpoint

__all__ = [
    "MULTIPROC_ENV",
    "HospitalExporter",
    "LedgerCollector",
    "count_refusal",
    "timed",
]

log = logging.getLogger("fedvault.client")

PREFIX = "fedvault_hospital_"
Phase = Literal["training", "encryption", "decryption"]
# Encryption and decryption take milliseconds to seconds; training up to an hour.
_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_DOCS = {
    "training": "Seconds of DP-SGD training per round",
    "encryption": "Seconds to mask and encrypt an update",
    "decryption": "Seconds to decrypt a global model",
}

# ---- the ClientApp processes --------------------------------------------------------------


@cache
def _app_metrics() -> tuple[dict[str, Histogram], Counter] | None:
    """The ClientApp's metrics, or ``None`` when no daemon collects them."""
    if not os.environ.get(MULTIPROC_ENV):
        return None
    # registry=None: in multiprocess mode the values go to files the daemon merges.
    phases = {
        phase: Histogram(PREFIX + f"{phase}_seconds", doc, buckets=_BUCKETS, registry=None)
        for phase, doc in _DOCS.items()
    }
    refusals = Counter(
        PREFIX + "refusals", "Requests this hospital refused, by reason", ["reason"], registry=None
    )
    return phases, refusals


@contextmanager
def timed(phase: Phase) -> Iterator[None]:
    """Time one training, encryption or decryption (only when it succeeds)."""
    started = time.perf_counter()
    yield
    if (metrics := _app_metrics()) is not None:
        metrics[0][phase].observe(time.perf_counter() - started)


def count_refusal(reason: str) -> None:
    """Count one refusal; ``reason`` is its refusal code (a short fixed set)."""
    if (metrics := _app_metrics()) is not None:
        metrics[1].labels(reason=reason).inc()


# ---- the hospital's records, read at scrape time -----------------------------------------


class LedgerCollector(Collector):
    """The hospital's privacy ledger and budgets, read when Prometheus scrapes.

    Parameters
    ----------
    state_dir
        The hospital's state directory (``ledger.sqlite``, ``models/JOB/job.json``).
    hospital
        The hospital's name (a ledger belongs to one hospital).
    epsilon_budget
        ``--epsilon-budget``: the hospital's own cap over all jobs; ``None``:
        each job's ε, as the ClientApp's budget check uses.
    device
        The device it trains on (``cpu``, ``cuda:0``, ...).
    """

    def __init__(
        self, state_dir: Path, hospital: str, *, epsilon_budget: float | None, device: str
    ) -> None:
        self.state_dir, self.hospital = Path(state_dir), hospital
        self.epsilon_budget, self.device = epsilon_budget, device
        self._lock = threading.Lock()

    def _budget(self, job: str) -> float | None:
        if self.epsilon_budget is not None:
            return self.epsilon_budget
        from fedvault.client.archive import ModelArchive

        try:
            config, _ = ModelArchive(self.state_dir).job_info(job)
            epsilon = json.loads(config)["privacy"]["epsilon"]
        except (FedvaultError, KeyError, TypeError, ValueError):
            return None  # no model of the job archived yet: its budget is unknown here
        return float(epsilon)

    def collect(self) -> Iterable[Metric]:
        """The ledger's metrics now."""
        device = InfoMetricFamily(PREFIX + "device", "The device this hospital trains on")
        device.add_metric([], {"device": self.device})
        families: list[Metric] = [device]
        path = self.state_dir / "ledger.sqlite"
        if not path.exists():
            return families  # nothing trained yet (and a scrape must not create the ledger)
        from fedvault.client.ledger import LocalLedger

        trained = CounterMetricFamily(
            PREFIX + "rounds_trained",
            "Training runs on the ledger (retrains count)",
            labels=["fl_job"],
        )
        spent = GaugeMetricFamily(
            PREFIX + "epsilon_spent", "The job's cumulative ε (privacy ledger)", labels=["fl_job"]
        )
        budget = GaugeMetricFamily(
            PREFIX + "epsilon_budget", "The ε budget a round of the job is checked against",
            labels=["fl_job"],
        )  # fmt: skip
        remaining = GaugeMetricFamily(
            PREFIX + "epsilon_remaining", "Budget minus ε spent over all jobs", labels=["fl_job"]
        )
        with self._lock, LocalLedger(path, hospital=self.hospital) as ledger:
            entries = ledger.entries()
            last = {e.job: e for e in entries}
            for job, entry in sorted(last.items()):
                trained.add_metric([job], sum(e.job == job for e in entries))
                spent.add_metric([job], entry.epsilon)
                cap = self._budget(job)
                if cap is not None:
                    budget.add_metric([job], cap)
                    remaining.add_metric([job], cap - ledger.spent(delta=entry.delta))
        return [*families, trained, spent, budget, remaining]


# ---- the daemon's endpoint ------------------------------------------------------------------


class HospitalExporter(MetricsEndpoint):
    """The hospital daemon's ``/metrics``: the ledger's and the ClientApps' metrics.

    Does nothing when ``port`` is ``None``; see :class:`MetricsEndpoint`.
    """

    def __init__(
        self, collector: LedgerCollector, port: int | None, *, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(collector, collector.state_dir / "prometheus", port, host=host)
