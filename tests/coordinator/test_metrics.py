"""The coordinator's Prometheus endpoint against a round store filled through its API.

Scraped over real HTTP from :class:`CoordinatorExporter`; the ServerApp's
timings come from a separate process in prometheus_client's multiprocess mode,
as Flower's ``flwr-serverapp`` writes them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedvault.coordinator.metrics import MULTIPROC_ENV, CoordinatorExporter, reason_label
from fedvault.coordinator.records import AuditEvent, ModelBlob, Participation, RoundCommit
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.errors import InvalidConfigError
from fedvault.flower_env import free_port

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
JOB = "metrics-job"
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
REJECTION = "unmask answer from node 1234 names 'hospital-9', not 'hospital-1'; left out"
REFUSAL = "BudgetExhaustedError: hospital-3: round 1 would raise epsilon to 3.20 > budget 3.00"


def _ok(hospital: str, epsilon: float, nbytes: int) -> Participation:
    return Participation(
        hospital=hospital, status="ok", samples=100, train_loss=0.6931, epsilon=epsilon,
        delta=1e-5, noise_multiplier=1.1, sample_rate=0.1, steps=10, accountant="prv",
        bytes_received=nbytes,
    )  # fmt: skip


def _commit(number: int, *participations: Participation) -> RoundCommit:
    return RoundCommit(
        number=number,
        model=ModelBlob(round=number, kind="bfv", blob=b"ciphertext", total_weight=200.0),
        participations=participations,
        train_loss=0.6931,
    )


def _fill(url: str) -> None:
    with RoundStore(url) as store:
        for i, hospital in enumerate(HOSPITALS):
            store.append_audit(
                AuditEvent(kind="node_enrolled", actor="coordinator",
                           detail={"hospital": hospital, "node_id": 100 + i})
            )  # fmt: skip
        job = store.open_job(JOB, {"rounds": 3, "privacy": {"epsilon": 3.0, "delta": 1e-5}})
        refused = Participation(hospital="hospital-3", status="refused", reason=REFUSAL)
        store.commit_round(job.id, _commit(1, _ok("hospital-1", 0.5, 1000),
                                           _ok("hospital-2", 0.6, 2000), refused))  # fmt: skip
        store.record_failed_round(
            job.id,
            2,
            reason="1 of 2 required hospitals contributed",
            participations=[
                Participation(hospital="hospital-1", status="rejected", reason=REJECTION),
                Participation(hospital="hospital-2", status="failed", reason="no reply in 30 s"),
            ],
        )
        store.commit_round(
            job.id, _commit(2, _ok("hospital-1", 0.9, 1500), _ok("hospital-2", 1.1, 2500))
        )
        store.record_failed_round(job.id, 3, reason="offline", participations=[
            Participation(hospital="hospital-2", status="ok", samples=100, bytes_received=700),
            Participation(hospital="hospital-1", status="failed", reason="offline"),
        ])  # fmt: skip


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[f"fedvault_coordinator_{name}", frozenset(labels.items())]


@pytest.fixture
def exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CoordinatorExporter]:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # prepare() sets it; undone afterwards
    url = sqlite_url(tmp_path / "fedvault.db")
    _fill(url)
    with CoordinatorExporter(url, tmp_path / "state", free_port()) as exp:
        exp.prepare()
        exp.start()
        yield exp


def test_store_metrics_match_the_store(exporter: CoordinatorExporter) -> None:
    s = _scrape(exporter.url)
    assert _get(s, "hospitals_enrolled") == 3
    assert _get(s, "job_running", fl_job=JOB) == 1
    assert _get(s, "planned_rounds", fl_job=JOB) == 3
    assert _get(s, "committed_rounds", fl_job=JOB) == 2
    assert _get(s, "current_round", fl_job=JOB) == 3
    assert _get(s, "failed_attempts_total", fl_job=JOB) == 2
    assert _get(s, "current_round_failed_attempts", fl_job=JOB) == 1
    assert _get(s, "round_participants", fl_job=JOB) == 2
    assert _get(s, "last_commit_timestamp_seconds", fl_job=JOB) > 1.7e9
    h1, h3 = {"fl_job": JOB, "hospital": "hospital-1"}, {"fl_job": JOB, "hospital": "hospital-3"}
    assert _get(s, "participations_total", **h1, status="ok") == 2
    assert _get(s, "participations_total", **h1, status="rejected") == 1
    assert _get(s, "participations_total", **h1, status="failed") == 1
    assert _get(s, "participations_total", **h3, status="refused") == 1
    assert _get(s, "received_bytes_total", fl_job=JOB, hospital="hospital-2") == 2000 + 2500 + 700
    assert _get(s, "hospital_last_round", **h1) == 2
    assert _get(s, "hospital_last_round", **h3) == 0  # enrolled, never contributed
    rejected = "unmask answer from node N names '*', not '*'"
    assert _get(s, "rejected_updates_total", fl_job=JOB, reason=rejected) == 1
    assert _get(s, "refusals_total", fl_job=JOB, reason="BudgetExhaustedError") == 1
    assert _get(s, "hospitals_connected", fl_job=JOB) == 1  # the latest attempt: hospital-2 only
    assert _get(s, "epsilon_spent", **h1) == 0.9
    assert _get(s, "epsilon_spent", fl_job=JOB, hospital="hospital-2") == 1.1
    assert ("fedvault_coordinator_epsilon_spent", frozenset(h3.items())) not in s
    assert _get(s, "epsilon_budget", **h3) == 3.0
    # Nothing derived from the model: the stored training loss is nowhere.
    assert not [k for k in s if "loss" in k[0] or "accuracy" in k[0]]
    assert 0.6931 not in s.values()


def test_a_new_commit_shows_at_the_next_scrape(
    exporter: CoordinatorExporter, tmp_path: Path
) -> None:
    assert _get(_scrape(exporter.url), "committed_rounds", fl_job=JOB) == 2
    with RoundStore(sqlite_url(tmp_path / "fedvault.db")) as store:
        job = store.get_job(JOB)
        assert job is not None
        store.commit_round(
            job.id, _commit(3, _ok("hospital-1", 1.3, 10), _ok("hospital-3", 1.0, 5))
        )
        store.set_job_status(job.id, "finished")
    s = _scrape(exporter.url)
    assert _get(s, "committed_rounds", fl_job=JOB) == _get(s, "current_round", fl_job=JOB) == 3
    assert _get(s, "job_running", fl_job=JOB) == 0
    assert _get(s, "current_round_failed_attempts", fl_job=JOB) == 0
    assert _get(s, "hospital_last_round", fl_job=JOB, hospital="hospital-3") == 3


APP_PROCESS = textwrap.dedent(
    """
    import time
    from fedvault.coordinator.metrics import observe_commit, observe_round
    observe_round("metrics-job", 42.0)
    observe_round("metrics-job", 3.0)
    with observe_commit("metrics-job"):
        time.sleep(0.01)
    """
)


def test_server_app_timings_reach_the_daemon_through_the_multiprocess_directory(
    exporter: CoordinatorExporter,
) -> None:
    directory = os.environ[MULTIPROC_ENV]  # what Flower's children inherit
    assert Path(directory).is_dir() and not any(Path(directory).iterdir())
    for _ in range(2):  # two app processes, as two Flower runs would be
        subprocess.run([sys.executable, "-c", APP_PROCESS], check=True, env=dict(os.environ))
    s = _scrape(exporter.url)
    assert _get(s, "round_duration_seconds_count", fl_job=JOB) == 4
    assert _get(s, "round_duration_seconds_sum", fl_job=JOB) == 90.0
    assert _get(s, "round_duration_seconds_bucket", fl_job=JOB, le="5.0") == 2
    assert _get(s, "store_commit_seconds_count", fl_job=JOB) == 2
    assert _get(s, "store_commit_seconds_sum", fl_job=JOB) >= 0.02
    # Every coordinator metric the alert rules use is exported under that name.
    used = set(re.findall(r"fedvault_coordinator_\w+", (RULES / "alerts.yml").read_text()))
    assert used and used <= {name for name, _ in s}, used - {name for name, _ in s}


def test_app_calls_do_nothing_without_a_daemon(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    subprocess.run([sys.executable, "-c", APP_PROCESS], check=True, env=env, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_taken_port_is_refused_with_advice(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "fedvault.db")
    _fill(url)
    with CoordinatorExporter(url, tmp_path, free_port()) as first:
        first.start()
        second = CoordinatorExporter(url, tmp_path, first.port)
        with pytest.raises(InvalidConfigError, match="--metrics-port"):
            second.start()


def test_reason_labels_are_bounded() -> None:
    assert reason_label(REFUSAL) == "BudgetExhaustedError"
    one = reason_label("hospital-1 sent an unmasked update to a masked round; left out", HOSPITALS)
    two = reason_label("hospital-2 sent an unmasked update to a masked round; left out", HOSPITALS)
    assert one == two == "HOSPITAL sent an unmasked update to a masked round"
    assert reason_label("") == "unspecified"
    assert len(reason_label("x" * 500)) == 80


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found: `apt-get install -y prometheus` (Debian) provides it"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return found


@pytest.mark.parametrize(
    "command",
    [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
        ["check", "config", "prometheus.yml"],
    ],
    ids=" ".join,
)
def test_alert_rules_pass_promtool(command: list[str]) -> None:
    done = subprocess.run(
        [_promtool(), *command], cwd=RULES, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_prepare_empties_what_an_earlier_daemon_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    stale = tmp_path / "prometheus" / "histogram_12345.db"
    stale.parent.mkdir()
    stale.write_bytes(b"left by the previous run")
    CoordinatorExporter(sqlite_url(tmp_path / "fedvault.db"), tmp_path, free_port()).prepare()
    assert os.environ[MULTIPROC_ENV] == str(stale.parent)
    assert stale.parent.is_dir() and not stale.exists()
    CoordinatorExporter(sqlite_url(tmp_path / "fedvault.db"), tmp_path / "off", None).prepare()
    assert not (tmp_path / "off").exists()  # metrics off: nothing is touched
