"""MLflow tracking: the tracker follows a real round store into a real MLflow file store.

The coordinator's path (no hospital key): a ``none`` job's final model is read
from the store and logged; an ``he`` job's is not, and the run says so. The
simulation's path (the decrypted model) runs one real simulation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedvault.app.cli import app
from fedvault.config import JobConfig
from fedvault.coordinator.records import AuditEvent, HospitalEval, ModelBlob, RoundCommit
from fedvault.coordinator.report import build_report
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.coordinator.tracking import (
    TAG_JOB,
    TAG_MODEL,
    TAG_MODEL_URI,
    CoordinatorTracker,
    MlflowTracker,
)
from fedvault.npz import arrays_to_bytes
from fedvault.task_registry import load_task

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

TASK = load_task("breast-cancer").task
HOSPITALS = ("hospital-1", "hospital-2")


def _weights(number: int) -> dict[str, np.ndarray]:
    torch.manual_seed(number)
    return {k: v.numpy().copy() for k, v in TASK.build_model().state_dict().items()}


def _evals(number: int) -> list[HospitalEval]:
    return [
        HospitalEval(
            hospital=h,
            accuracy=0.8 + 0.05 * number + 0.01 * i,
            loss=0.5 / number + 0.01 * i,
            samples=50,
            metrics={"auroc": 0.9 + 0.01 * number},
        )
        for i, h in enumerate(HOSPITALS)
    ]


class Job:
    """A job written into a real SQLite round store round by round, as the ServerApp does."""

    def __init__(self, tmp: Path, mode: str, rounds_data: Any) -> None:
        self.url = sqlite_url(tmp / f"{mode}.sqlite")
        self.mode = mode
        self.data = rounds_data
        self.config = JobConfig.for_task(
            TASK, hospitals=2, rounds=2, secure_aggregation=mode, job=f"track-{mode}"
        )
        with RoundStore(self.url) as store:
            self.id = store.open_job(self.config.job, self.config.to_dict()).id
            store.append_audit(
                AuditEvent(kind="job_started", actor="coordinator", detail={}), job_id=self.id
            )

    def commit(self, number: int) -> None:
        ok = [self.data.participation(h, number) for h in HOSPITALS]
        if self.mode == "none":
            model = ModelBlob(number, "plain", arrays_to_bytes(_weights(number)), 300.0)
        else:
            model = ModelBlob(number, "bfv", self.data.blob(number), 300.0)
        with RoundStore(self.url) as store:
            if number == 1:  # one failed attempt before round 1 commits
                store.record_failed_round(self.id, 1, reason="below quorum", participations=ok[:1])
            store.commit_round(
                self.id,
                RoundCommit(number=number, model=model, participations=tuple(ok), train_loss=0.4),
            )
            if number > 1:  # a round's model is evaluated with the next round
                self.evaluate(store, number - 1)

    def evaluate(self, store: RoundStore, number: int) -> None:
        pooled = {"accuracy": 0.81 + 0.05 * number, "auroc": 0.9 + 0.01 * number}
        store.record_evaluation(self.id, number, evaluations=_evals(number), pooled=pooled)

    def finish(self) -> None:
        with RoundStore(self.url) as store:
            self.evaluate(store, 2)
            store.set_job_status(self.id, "finished")


@pytest.fixture
def uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A file store; this test's own reader opts into MLflow 3's file store, as --mlflow does."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    found = f"file:{tmp_path / 'mlruns'}"
    mlflow.set_tracking_uri(found)  # where load_model resolves models:/ URIs
    yield found
    mlflow.set_tracking_uri(None)


def _runs(client: MlflowClient, job: str) -> list[Any]:
    experiment = client.get_experiment_by_name("fedvault")
    assert experiment is not None
    return list(
        client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_JOB}` = '{job}'")
    )


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    entries = client.get_metric_history(run_id, key)
    steps = [m.step for m in entries]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {steps}"
    return {m.step: m.value for m in entries}


def _wait_for(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_none_job_is_logged_across_a_coordinator_restart_with_its_model(
    tmp_path: Path, uri: str, data: Any
) -> None:
    job = Job(tmp_path, "none", data)
    client = MlflowClient(uri)
    first = CoordinatorTracker(uri, job.url, poll_s=0.1).start()
    job.commit(1)
    _wait_for(lambda: bool(_runs(client, job.config.job)), "the job's run")
    run_id = _runs(client, job.config.job)[0].info.run_id
    _wait_for(lambda: _history(client, run_id, "participants"), "round 1")
    first.stop()  # the coordinator shuts down mid-job
    assert client.get_run(run_id).info.status == "KILLED"

    second = CoordinatorTracker(uri, job.url, poll_s=0.1)  # the restarted coordinator
    job.commit(2)
    job.finish()
    second.poll()  # sees the job as finished: follows it no more, once its end is logged
    second.stop()

    runs = _runs(client, job.config.job)
    assert [r.info.run_id for r in runs] == [run_id], "a restart re-attaches to the same run"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == job.config.job
    params = run.data.params
    assert params["task"] == "breast-cancer"
    assert params["mode"] == "none"
    assert params["privacy.epsilon"] == str(job.config.privacy.epsilon)
    assert params["training.batch_size"] == str(job.config.training.batch_size)
    assert params["hospitals"] == "2" and params["rounds"] == "2"
    with RoundStore(job.url) as store:
        report = build_report(store, job.config.job)
    assert _history(client, run_id, "participants") == {1: 2.0, 2: 2.0}
    assert _history(client, run_id, "failed_attempts") == {1: 1.0, 2: 0.0}
    assert set(_history(client, run_id, "round_seconds")) == {1, 2}
    for r in report.rounds:
        assert r.loss is not None and r.accuracy is not None
        assert _history(client, run_id, "loss")[r.round] == pytest.approx(r.loss)
        assert _history(client, run_id, "accuracy")[r.round] == pytest.approx(r.accuracy)
        assert _history(client, run_id, "auroc")[r.round] == pytest.approx(r.metrics["auroc"])
        for hospital, eps in r.epsilon.items():
            assert _history(client, run_id, f"epsilon.{hospital}")[r.round] == pytest.approx(eps)
    assert run.data.metrics["final.rounds_completed"] == 2.0
    assert run.data.metrics["final.failed_attempts"] == 1.0
    local = client.download_artifacts(run_id, "report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == json.loads(json.dumps(report.to_json()))

    assert run.data.tags[TAG_MODEL] == "logged"
    logged = mlflow.pytorch.load_model(run.data.tags[TAG_MODEL_URI])
    expected = TASK.build_model()
    expected.load_state_dict({k: torch.from_numpy(v) for k, v in _weights(2).items()})
    x = torch.randn(17, 30)
    with torch.no_grad():
        torch.testing.assert_close(logged(x), expected(x))


@pytest.mark.parametrize("backend", ["file", "sqlite"])
def test_he_job_logs_no_model_and_says_why(
    tmp_path: Path, uri: str, data: Any, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory (MLflow's ./mlruns)
    job = Job(tmp_path, "he", data)
    job.commit(1)
    job.commit(2)
    job.finish()
    tracker = MlflowTracker(uri, job.url, job.config.job)
    tracker.stop()  # never started: one final sync logs everything and the end
    client = MlflowClient(uri)
    run = client.get_run(str(tracker.run_id))
    assert run.info.status == "FINISHED"
    assert run.data.params["mode"] == "he"
    assert run.data.tags[TAG_MODEL].startswith("not logged: he mode")
    assert TAG_MODEL_URI not in run.data.tags
    assert run.data.metrics["epsilon.hospital-2"] == pytest.approx(data.epsilon("hospital-2", 2))
    local = client.download_artifacts(str(tracker.run_id), "report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["final"]["rounds_completed"] == 2
    assert list(cwd.iterdir()) == []

    again = MlflowTracker(uri, job.url, job.config.job)  # e.g. simulate re-run on an ended job
    again.stop()
    assert again.run_id == tracker.run_id
    assert len(client.get_metric_history(str(again.run_id), "final.rounds_completed")) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--rounds", "1"],
        ["coordinator", "start", "--kit", "no-such-kit"],
    ],
)
def test_mlflow_without_the_extra_is_one_line_exit_2(
    tmp_path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    out = tmp_path / "out"
    extra = ["--out", str(out)] if args[0] == "simulate" else ["--state", str(out)]
    result = CliRunner().invoke(app, [*args, *extra, "--mlflow", f"file:{tmp_path / 'ml'}"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert "pip install 'fedvault[mlflow]'" in lines[0]
    assert not out.exists() and not (tmp_path / "ml").exists()


@pytest.mark.e2e
def test_simulate_logs_the_job_to_mlflow(tmp_path: Path, uri: str) -> None:
    """One real simulation (he mode): the run matches report.json; the model the export's."""
    from safetensors.torch import load_file

    out = tmp_path / "sim"
    cmd = [
        sys.executable, "-m", "fedvault", "simulate", "--example", "breast-cancer",
        "--hospitals", "3", "--rounds", "2", "--seed", "2", "--out", str(out),
        "--mlflow", uri,
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MLFLOW_ALLOW_FILE_STORE")  # the product opts in itself for a file: URI
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    client = MlflowClient(uri)
    (run,) = _runs(client, report["config"]["job"])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["mode"] == "he"
    assert run.data.params["hospitals"] == "3"
    assert run.data.params["privacy.epsilon"] == str(report["config"]["privacy"]["epsilon"])
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        step = r["round"]
        assert _history(client, run_id, "participants")[step] == len(r["participants"])
        assert _history(client, run_id, "loss")[step] == pytest.approx(r["loss"])
        assert _history(client, run_id, "accuracy")[step] == pytest.approx(r["accuracy"])
        for name, value in r["metrics"].items():
            assert _history(client, run_id, name)[step] == pytest.approx(value), name
        assert set(r["epsilon"]) == {"hospital-1", "hospital-2", "hospital-3"}
        for hospital, eps in r["epsilon"].items():
            assert _history(client, run_id, f"epsilon.{hospital}")[step] == pytest.approx(eps)
    assert run.data.metrics["final.epsilon_max"] == pytest.approx(report["final"]["epsilon_max"])
    local = client.download_artifacts(run_id, "report.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == report

    # The simulation holds the hospitals' keys, so the decrypted final model is logged.
    assert run.data.tags[TAG_MODEL] == "logged"
    logged = mlflow.pytorch.load_model(run.data.tags[TAG_MODEL_URI])
    exported = TASK.build_model()
    exported.load_state_dict(load_file(str(out / "model" / "model.safetensors")))
    assert TASK.load_data is not None
    _, test = TASK.load_data(2)
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        torch.testing.assert_close(logged(x), exported(x))
