"""A hospital's Prometheus endpoint against its real ledger and archive.

The ledger is filled through :class:`LocalLedger`, the job's configuration
archived through :class:`ModelArchive`, and ``/metrics`` scraped over HTTP from
:class:`HospitalExporter`; the ClientApp's timings and refusals come from
separate processes in prometheus_client's multiprocess mode, as Flower's
``flwr-clientapp`` processes write them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedvault.client.archive import ModelArchive
from fedvault.client.ledger import LocalLedger
from fedvault.client.metrics import MULTIPROC_ENV, HospitalExporter, LedgerCollector
from fedvault.config import JobConfig, TrainingConfig
from fedvault.flower_env import free_port
from fedvault.messages import ModelPayload
from fedvault.privacy.dp import PrivacyConfig

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HOSPITAL, DELTA = "hospital-2", 1e-5


def _job(name: str, epsilon: float) -> JobConfig:
    return JobConfig(
        job=name,
        task="breast-cancer",
        hospitals=3,
        rounds=5,
        privacy=PrivacyConfig(epsilon=epsilon, delta=DELTA),
        training=TrainingConfig(batch_size=32, learning_rate=0.1),
    )


def _train(ledger: LocalLedger, job: str, rounds: int) -> None:
    for server_round in range(1, rounds + 1):
        state = ledger.state(job).extended(noise_multiplier=1.0, sample_rate=0.1, steps=20)
        ledger.record_round(job=job, server_round=server_round, state=state, delta=DELTA)


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[f"fedvault_hospital_{name}", frozenset(labels.items())]


def _exporter(state: Path, budget: float | None) -> HospitalExporter:
    collector = LedgerCollector(state, HOSPITAL, epsilon_budget=budget, device="cpu")
    return HospitalExporter(collector, free_port())


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "hospital-state"


@pytest.fixture
def exporter(state: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HospitalExporter]:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # prepare() sets it; undone afterwards
    with _exporter(state, None) as exp:
        exp.prepare()
        exp.start()
        yield exp


def test_ledger_metrics_match_the_ledger(exporter: HospitalExporter, state: Path) -> None:
    before = _scrape(exporter.url)
    assert _get(before, "device_info", device="cpu") == 1
    assert not (state / "ledger.sqlite").exists()  # a scrape does not create the ledger
    assert not [k for k in before if k[0].startswith("fedvault_hospital_epsilon")]
    archive = ModelArchive(state)
    for name, epsilon in (("job-a", 3.0), ("job-b", 8.0)):
        job = _job(name, epsilon)
        archive.put_model(name, 0, ModelPayload(envelope=b"ct"), job_config=job.to_json(),
                          task_fingerprint="")  # fmt: skip
    with LocalLedger(state / "ledger.sqlite", hospital=HOSPITAL) as ledger:
        _train(ledger, "job-a", 3)
        _train(ledger, "job-b", 1)
        _train(ledger, "job-c", 1)  # no model archived: its budget is unknown here
        entries = {e.job: e for e in ledger.entries()}
        total = ledger.spent(delta=DELTA)
    s = _scrape(exporter.url)
    assert _get(s, "rounds_trained_total", fl_job="job-a") == 3
    assert _get(s, "rounds_trained_total", fl_job="job-b") == 1
    for job in ("job-a", "job-b", "job-c"):
        assert _get(s, "epsilon_spent", fl_job=job) == entries[job].epsilon
    assert entries["job-a"].epsilon > entries["job-b"].epsilon > 0
    assert _get(s, "epsilon_budget", fl_job="job-a") == 3.0
    assert _get(s, "epsilon_budget", fl_job="job-b") == 8.0
    # The budget check composes every job on the hospital's data: so does "remaining".
    assert _get(s, "epsilon_remaining", fl_job="job-a") == pytest.approx(3.0 - total, rel=1e-9)
    assert total > entries["job-a"].epsilon
    assert ("fedvault_hospital_epsilon_budget", frozenset({("fl_job", "job-c")})) not in s
    # Every hospital metric the alert rules use is exported under that name.
    rules = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
    used = set(re.findall(r"fedvault_hospital_\w+", rules.read_text()))
    assert used and used <= {name for name, _ in s}, used - {name for name, _ in s}


def test_the_hospitals_own_cap_is_the_budget(state: Path) -> None:
    with LocalLedger(state / "ledger.sqlite", hospital=HOSPITAL) as ledger:
        _train(ledger, "job-a", 2)
        spent = ledger.spent(delta=DELTA)
    with _exporter(state, 1.5) as exporter:
        exporter.start()
        s = _scrape(exporter.url)
    assert _get(s, "epsilon_budget", fl_job="job-a") == 1.5
    assert _get(s, "epsilon_remaining", fl_job="job-a") == pytest.approx(1.5 - spent, rel=1e-9)


APP_PROCESS = textwrap.dedent(
    """
    import time
    from fedvault.client.metrics import count_refusal, timed
    with timed("training"):
        time.sleep(0.05)
    with timed("encryption"):
        pass
    with timed("decryption"):
        pass
    count_refusal("budget_exhausted")
    try:
        with timed("training"):
            raise ValueError("a failed training is not timed")
    except ValueError:
        pass
    """
)


def test_client_app_timings_and_refusals_reach_the_daemon(exporter: HospitalExporter) -> None:
    directory = Path(os.environ[MULTIPROC_ENV])  # what the SuperNode's children inherit
    assert directory == exporter.collector.state_dir / "prometheus"
    for _ in range(2):  # one process per ClientApp message, as Flower runs them
        subprocess.run([sys.executable, "-c", APP_PROCESS], check=True, env=dict(os.environ))
    s = _scrape(exporter.url)
    assert _get(s, "training_seconds_count") == 2
    assert _get(s, "training_seconds_sum") >= 0.1
    assert _get(s, "encryption_seconds_count") == _get(s, "decryption_seconds_count") == 2
    assert _get(s, "refusals_total", reason="budget_exhausted") == 2


def test_a_restarted_daemon_starts_from_an_empty_directory(
    exporter: HospitalExporter, state: Path
) -> None:
    subprocess.run([sys.executable, "-c", APP_PROCESS], check=True, env=dict(os.environ))
    assert any((state / "prometheus").iterdir())
    exporter.stop()
    with _exporter(state, None) as again:
        again.prepare()
        again.start()
        s = _scrape(again.url)
    assert ("fedvault_hospital_training_seconds_count", frozenset()) not in s


def test_metrics_off_serves_nothing_and_leaves_the_environment(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    collector = LedgerCollector(state, HOSPITAL, epsilon_budget=None, device="cpu")
    with HospitalExporter(collector, None) as off:
        off.prepare()
        off.start()
    assert MULTIPROC_ENV not in os.environ
    assert not state.exists()
