"""The operator's job file (``fedvault coordinator start --job job.toml``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvault.config import JobConfig
from fedvault.coordinator.daemon import load_job_file
from fedvault.errors import InvalidConfigError

HEAD = '[job]\nname = "oncology"\nexample = "breast-cancer"\nhospitals = 4\nrounds = 3\n'


def _job(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "job.toml"
    path.write_text(HEAD + extra)
    return path


def test_job_settings_reach_the_config_and_survive_the_store(tmp_path: Path) -> None:
    extra = (
        "min_hospitals = 3\nround_timeout_s = 900\nmax_round_attempts = 5\n"
        'accountant = "rdp"\nepsilon = 2.0\n'
    )
    job = load_job_file(_job(tmp_path, extra))
    assert (job.job, job.hospitals, job.rounds, job.quorum) == ("oncology", 4, 3, 3)
    assert (job.round_timeout_s, job.max_round_attempts) == (900, 5)
    assert (job.privacy.epsilon, job.privacy.accountant) == (2.0, "rdp")
    assert JobConfig.from_json(job.to_json()) == job  # what the ServerApp receives
    assert load_job_file(_job(tmp_path)).privacy.accountant == "prv"  # the default


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ('accountant = "gdp"\n', "accountant must be one of"),
        ("round_timeout_s = 0\n", "round_timeout_s must be > 0"),
        ("rounds_timeout = 5\n", "unknown job setting 'rounds_timeout'"),
    ],
)
def test_a_bad_setting_is_named(tmp_path: Path, extra: str, match: str) -> None:
    with pytest.raises(InvalidConfigError, match=match):
        load_job_file(_job(tmp_path, extra))


def test_missing_or_broken_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="not found"):
        load_job_file(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[job\n")
    with pytest.raises(InvalidConfigError, match="not valid TOML"):
        load_job_file(tmp_path / "bad.toml")


def test_the_job_names_its_task_and_the_task_supplies_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[job]\nname = "j"\ntask = "digits"\nhospitals = 2\nrounds = 1\n')
    job = load_job_file(path)
    from fedvault.examples.digits import TASK

    assert job.task == "digits" and job.training.batch_size == TASK.defaults.batch_size
    assert job.best_metric == TASK.best_metric == "balanced_accuracy"
    path.write_text(
        '[job]\nname = "j"\ntask = "fedvault.examples.digits:TASK"\nhospitals = 2\nrounds = 1\n'
        'best_metric = "accuracy"\n'
    )
    job = load_job_file(path)
    assert (job.task, job.best_metric) == ("fedvault.examples.digits:TASK", "accuracy")


@pytest.mark.parametrize(
    ("job", "match"),
    [
        ('task = "nope"\n', "unknown task 'nope': installed tasks are"),
        ('task = "no_such_module:TASK"\n', "fails to import"),
        ('task = "digits"\nexample = "digits"\n', "either task or example"),
        ("", "needs task"),
    ],
)
def test_a_bad_task_is_refused_with_the_reason(tmp_path: Path, job: str, match: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(f'[job]\nname = "j"\n{job}hospitals = 2\nrounds = 1\n')
    with pytest.raises(InvalidConfigError, match=match):
        load_job_file(path)


def test_jobs_stored_before_tasks_still_read() -> None:
    stored = JobConfig.for_task(
        __import__("fedvault.examples.digits", fromlist=["TASK"]).TASK, hospitals=2, rounds=1
    ).to_dict()
    stored["example"] = stored.pop("task")
    assert JobConfig.from_dict(stored).task == "digits"


def test_a_job_does_not_resume_with_other_task_code() -> None:
    from fedvault.coordinator.daemon import check_task_unchanged
    from fedvault.coordinator.records import AuditEvent
    from fedvault.coordinator.store import RoundStore
    from fedvault.errors import TaskMismatchError
    from fedvault.task_registry import describe

    ours = describe("digits").fingerprint_json
    from fedvault.fingerprint import TaskFingerprint

    digest = TaskFingerprint.from_json(ours).digest
    with RoundStore("sqlite://") as store:
        job = store.open_job("j", {"rounds": 1})
        check_task_unchanged(store, job.id, ours)  # not started yet: nothing to compare
        started = {"task_fingerprint": "sha256:" + "0" * 64, "task_version": "0.0.9"}
        store.append_audit(AuditEvent(kind="job_started", actor="c", detail=started), job_id=job.id)
        with pytest.raises(TaskMismatchError, match=r"started with task fingerprint sha256:0+ "):
            check_task_unchanged(store, job.id, ours)
    with RoundStore("sqlite://") as store:
        job = store.open_job("j", {"rounds": 1})
        same = {"task_fingerprint": digest, "task_version": ""}
        store.append_audit(AuditEvent(kind="job_started", actor="c", detail=same), job_id=job.id)
        check_task_unchanged(store, job.id, ours)
