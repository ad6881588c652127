"""How long the coordinator waits for hospitals to connect and for key-ceremony replies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedvault.config import JobConfig
from fedvault.coordinator.key_ceremony import KeyDirectory
from fedvault.coordinator.server_app import CoordinatorSettings, _RoundRunner
from fedvault.examples import get_example
from fedvault.task_registry import load_task


def _settings(tmp_path: Path, **job: object) -> CoordinatorSettings:
    config = JobConfig.for_example(
        get_example("breast-cancer"),
        hospitals=3,
        rounds=1,
        **job,  # type: ignore[arg-type]
    )
    return CoordinatorSettings(
        job=config,
        store_url="sqlite://",
        task=load_task("breast-cancer"),
        key_directory=KeyDirectory(tmp_path),
        custodian="hospital-a",
    )


def test_the_wait_for_hospitals_and_the_key_ceremony_follow_the_job(tmp_path: Path) -> None:
    # A consortium of 100 needs more than a fixed 2 minutes for 100 ceremony
    # replies; the job file's round_timeout_s sets both windows.
    runner = _RoundRunner(None, _settings(tmp_path, round_timeout_s=900), None, 1)  # type: ignore[arg-type]
    assert runner.node_wait_s == 900
    assert runner.ceremony is not None and runner.ceremony.timeout_s == 900


def test_an_explicit_wait_overrides_the_round_timeout(tmp_path: Path) -> None:
    settings = dataclasses.replace(_settings(tmp_path, round_timeout_s=900), node_wait_s=5.0)
    runner = _RoundRunner(None, settings, None, 1)  # type: ignore[arg-type]
    assert runner.node_wait_s == 5.0 and runner.ceremony is not None
    assert runner.ceremony.timeout_s == 5.0
