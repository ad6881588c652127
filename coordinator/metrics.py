"""Prometheus metrics of the coordinator (``fedvault coordinator start --metrics-port``).

Two sources, one ``/metrics`` endpoint served by the daemon:

* **The round store, read at scrape time** (:class:`StoreCollector`): rounds,
  participations, failed attempts, rejections and refusals with their reason,
  bytes received, the privacy ledger and enrolments. The store is the source of
  truth, so what Prometheus sees is exactly what the store holds, and it
  survives daemon restarts.
* **What only the ServerApp process sees** (:func:`observe_round`,
  :func:`observe_commit`): Flower runs the ServerApp in its own process
  (``flwr-serverapp``, started by the SuperLink's SuperExec), so its timings go
  through prometheus_client's multiprocess mode: the daemon empties a directory
  and names it in ``PROMETHEUS_MULTIPROC_DIR`` before Flower starts, the app
  processes inherit the variable and write there, and the daemon's registry
  merges their files (:class:`~prometheus_client.multiprocess.MultiProcessCollector`).
  Without the variable (``fedvault simulate``, metrics off) these calls do nothing.

Nothing derived from model values is exported: no training loss, no evaluation
accuracy, loss or metric (they are computed from the model).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedvault.coordinator.records import Job, RoundView
from fedvault.coordinator.store import RoundStore
from fedvault.metrics_endpoint import MULTIPROC_ENV, MetricsEndpoint

__all__ = [
    "MULTIPROC_ENV",
    "CoordinatorExporter",
    "StoreCollector",
    "observe_commit",
    "observe_round",
    "reason_label",
]

log = logging.getLogger("fedvault.coordinator")

PREFIX = "fedvault_coordinator_"
# Rounds take seconds (a logistic regression on loopback) to an hour (a large model).
_ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
_COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# ---- the ServerApp process ---------------------------------------------------------------


@cache
def _app_metrics() -> tuple[Histogram, Histogram] | None:
    """The ServerApp's histograms, or ``None`` when no daemon collects them."""
    if not os.environ.get(MULTIPROC_ENV):
        return None
    rounds = Histogram(
        PREFIX + "round_duration_seconds",
        "Seconds from a round's first training attempt to its commit",
        ["fl_job"],
        buckets=_ROUND_BUCKETS,
        registry=None,  # multiprocess: the values go to files the daemon merges
    )
    commits = Histogram(
        PREFIX + "store_commit_seconds",
        "Seconds the round store took to commit one round",
        ["fl_job"],
        buckets=_COMMIT_BUCKETS,
        registry=None,
    )
    return rounds, commits


def observe_round(job: str, seconds: float) -> None:
    """A round of ``job`` committed ``seconds`` after its first attempt started."""
    if (metrics := _app_metrics()) is not None:
        metrics[0].labels(fl_job=job).observe(seconds)


@contextmanager
def observe_commit(job: str) -> Iterator[None]:
    """Time the store's commit of one round of ``job``."""
    started = time.perf_counter()
    yield
    if (metrics := _app_metrics()) is not None:
        metrics[1].labels(fl_job=job).observe(time.perf_counter() - started)


# ---- the store, read at scrape time -------------------------------------------------------

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?")
_ERROR_CLASS = re.compile(r"^([A-Z][A-Za-z0-9_]*(?:Error|Exception)): ")


def reason_label(reason: str, hospitals: Iterable[str] = ()) -> str:
    """A bounded label for a free-text refusal or rejection reason.

    A hospital's refusal starts with its error's class (``BudgetExhaustedError:
    ...``), which is the label. Otherwise the text up to its advice (the first
    ``;``), with hospital names, quoted values and numbers replaced, so one
    check in the code gives one label whatever the round, node or hospital.
    """
    if match := _ERROR_CLASS.match(reason):
        return match.group(1)
    text = reason.split(";", 1)[0]
    for name in sorted(hospitals, key=len, reverse=True):
        if name:
            text = text.replace(name, "HOSPITAL")
    text = _NUMBER.sub("N", _QUOTED.sub("'*'", text))
    return " ".join(text.split())[:80] or "unspecified"


class _Families:
    """The metric families of one scrape, created on first use, in a stable order."""

    def __init__(self) -> None:
        self.families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

    def add(
        self, kind: type[GaugeMetricFamily | CounterMetricFamily], name: str, doc: str,
        labels: Mapping[str, str], value: float,
    ) -> None:  # fmt: skip
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = kind(PREFIX + name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)


_GAUGE, _COUNTER = GaugeMetricFamily, CounterMetricFamily


class StoreCollector(Collector):
    """Every job's state in the round store, read when Prometheus scrapes.

    Parameters
    ----------
    store_url
        The coordinator's round store. It is opened without the at-rest key:
        nothing exported needs a sealed value.
    """

    def __init__(self, store_url: str) -> None:
        self._url = store_url
        self._store: RoundStore | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the store's connections."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def collect(self) -> Iterable[Metric]:
        """The store's metrics now (one consistent read per job)."""
        with self._lock:
            if self._store is None:
                self._store = RoundStore(self._url)
            store = self._store
            out = _Families()
            enrolled = sorted(
                {
                    str(e.detail.get("hospital"))
                    for e in store.audit_events()
                    if e.kind == "node_enrolled"
                }
            )
            out.add(_GAUGE, "hospitals_enrolled", "Hospitals whose node key is enrolled", {},
                    len(enrolled))  # fmt: skip
            for job in store.list_jobs():
                _job_metrics(out, job, store.rounds(job.id), enrolled)
                _ledger_metrics(out, job, store, enrolled)
        return list(out.families.values())


def _job_metrics(
    out: _Families, job: Job, rounds: Sequence[RoundView], enrolled: list[str]
) -> None:
    """Round progress, participations and rejections of one job."""
    j = {"fl_job": job.name}
    committed = [r for r in rounds if r.status == "committed"]
    failed = [r for r in rounds if r.status == "failed"]
    last = committed[-1].number if committed else 0
    planned = int(job.config.get("rounds", 0))
    running = job.status == "running"
    current = min(last + 1, planned) if running and last < planned else last
    out.add(_GAUGE, "job_running", "1 while the job's status is running", j, float(running))
    out.add(_GAUGE, "planned_rounds", "Rounds the job is configured for", j, planned)
    out.add(_GAUGE, "committed_rounds", "Last committed round (0: none yet)", j, last)
    out.add(_GAUGE, "current_round", "Round in progress, else the last committed", j, current)
    out.add(_COUNTER, "failed_attempts", "Failed round attempts", j, len(failed))
    out.add(_GAUGE, "current_round_failed_attempts", "Failed attempts at the current round", j,
            sum(r.number == current and current > last for r in failed))  # fmt: skip
    if committed:
        out.add(_GAUGE, "round_participants", "Hospitals that contributed to the last committed "
                "round", j, committed[-1].num_participants)  # fmt: skip
        stamp = committed[-1].committed_at
        if stamp is not None:
            out.add(_GAUGE, "last_commit_timestamp_seconds", "Unix time of the last commit", j,
                    stamp.timestamp())  # fmt: skip
    _participation_metrics(out, job, rounds, enrolled)


def _participation_metrics(
    out: _Families, job: Job, rounds: Sequence[RoundView], enrolled: list[str]
) -> None:
    """Per-hospital counts, bytes and last round seen, and reasons of rejections and refusals."""
    statuses: Counter[tuple[str, str]] = Counter()
    received: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {"rejected": Counter(), "refused": Counter()}
    last_seen = dict.fromkeys(enrolled, 0)
    names = set(enrolled) | {p.hospital for r in rounds for p in r.participations}
    latest: tuple[int, int] = (0, 0)
    answered: set[str] = set()
    for r in rounds:
        if (r.number, r.attempt) > latest:
            latest = (r.number, r.attempt)
            answered = {p.hospital for p in r.participations if p.status != "failed"}
        for p in r.participations:
            statuses[p.hospital, p.status] += 1
            received[p.hospital] += p.bytes_received
            if p.status in reasons:
                reasons[p.status][reason_label(p.reason, names)] += 1
            if p.status == "ok" and r.status == "committed":
                last_seen[p.hospital] = max(last_seen.get(p.hospital, 0), r.number)
    j = job.name
    for (hospital, status), n in sorted(statuses.items()):
        out.add(_COUNTER, "participations", "Hospital replies recorded, by status",
                {"fl_job": j, "hospital": hospital, "status": status}, n)  # fmt: skip
    for hospital, n in sorted(received.items()):
        out.add(_COUNTER, "received_bytes", "Update bytes received from the hospital",
                {"fl_job": j, "hospital": hospital}, n)  # fmt: skip
    for hospital, number in sorted(last_seen.items()):
        out.add(_GAUGE, "hospital_last_round", "Last committed round the hospital contributed to "
                "(0: none)", {"fl_job": j, "hospital": hospital}, number)  # fmt: skip
    for reason, n in sorted(reasons["rejected"].items()):
        out.add(_COUNTER, "rejected_updates", "Updates the coordinator rejected, by reason",
                {"fl_job": j, "reason": reason}, n)  # fmt: skip
    for reason, n in sorted(reasons["refused"].items()):
        out.add(_COUNTER, "refusals", "Rounds hospitals refused to train, by reason",
                {"fl_job": j, "reason": reason}, n)  # fmt: skip
    out.add(_GAUGE, "hospitals_connected", "Hospitals that answered the latest round attempt",
            {"fl_job": j}, len(answered))  # fmt: skip


def _ledger_metrics(out: _Families, job: Job, store: RoundStore, enrolled: list[str]) -> None:
    """Each hospital's ε spent (the latest ledger row) against the job's budget."""
    spent = {row.hospital: row.epsilon for row in store.ledger(job.id)}  # by round: last wins
    privacy = job.config.get("privacy")
    budget = privacy.get("epsilon") if isinstance(privacy, Mapping) else None
    for hospital in sorted(set(enrolled) | set(spent)):
        labels = {"fl_job": job.name, "hospital": hospital}
        if hospital in spent:
            out.add(_GAUGE, "epsilon_spent", "Hospital's cumulative ε in the job (privacy "
                    "ledger)", labels, spent[hospital])  # fmt: skip
        if isinstance(budget, int | float):
            out.add(_GAUGE, "epsilon_budget", "The job's ε budget per hospital", labels, budget)


# ---- the daemon's endpoint ------------------------------------------------------------------


class CoordinatorExporter(MetricsEndpoint):
    """The coordinator daemon's ``/metrics``: the store's and the ServerApp's metrics.

    Does nothing when ``port`` is ``None``; see :class:`MetricsEndpoint`.
    """

    def __init__(
        self, store_url: str, state_dir: Path, port: int | None, *, host: str = "127.0.0.1"
    ) -> None:
        self._store = StoreCollector(store_url)
        super().__init__(self._store, Path(state_dir) / "prometheus", port, host=host)

    def stop(self) -> None:
        """Stop serving and close the store."""
        super().stop()
        self._store.close()
