"""The run config the coordinator daemon submits and its ServerApp reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedvault.config import JobConfig, PrivacyConfig, TrainingConfig
from fedvault.coordinator import daemon
from fedvault.coordinator.run_settings import RUN_CONFIG_KEYS, RunSettings
from fedvault.errors import InvalidConfigError, StoreError
from fedvault.flower_env import ConfigValue

JOB = JobConfig(
    job="oncology",
    task="breast-cancer",
    hospitals=3,
    rounds=4,
    privacy=PrivacyConfig(epsilon=2.0, delta=1e-5),
    training=TrainingConfig(batch_size=8, learning_rate=0.1),
)
SETTINGS = RunSettings(
    job=JOB,
    store="sqlite:////srv/coordinator/fedvault.sqlite",
    state_dir=Path("/srv/coordinator"),
    custodian="hospital-1",
    kit=Path("/srv/kits/coordinator"),
)


def _context(run_config: dict[str, ConfigValue]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_settings_round_trip_through_a_flower_context() -> None:
    run_config = SETTINGS.to_flower()
    assert tuple(run_config) == RUN_CONFIG_KEYS
    assert all(isinstance(v, str) for v in run_config.values())
    assert run_config["kit"] == "/srv/kits/coordinator"  # the kit's path, never its key
    assert RunSettings.from_context(_context(run_config)) == SETTINGS


def test_the_daemon_declares_every_key_in_the_app(tmp_path: Path) -> None:
    pyproject = (daemon.write_app_dir(tmp_path) / "pyproject.toml").read_text()
    for key in RUN_CONFIG_KEYS:
        assert f'{key} = ""' in pyproject
    assert daemon.RUN_CONFIG_KEYS == RUN_CONFIG_KEYS  # still importable from the daemon


def test_a_bare_flwr_run_is_refused() -> None:
    empty: dict[str, ConfigValue] = dict.fromkeys(RUN_CONFIG_KEYS, "")
    with pytest.raises(StoreError, match=r"run config lacks \['job-config', 'store'"):
        RunSettings.from_context(_context(empty))
    partial = {**SETTINGS.to_flower(), "custodian": ""}
    del partial["kit"]
    with pytest.raises(StoreError, match=r"lacks \['custodian', 'kit'\].*fedvault coordinator"):
        RunSettings.from_context(_context(partial))


def test_mistyped_values_are_refused() -> None:
    with pytest.raises(InvalidConfigError, match=r"must be strings; got store = 5 \(int\)"):
        RunSettings.from_flower({**SETTINGS.to_flower(), "store": 5})
    with pytest.raises(InvalidConfigError, match="job configuration is not valid JSON"):
        RunSettings.from_flower({**SETTINGS.to_flower(), "job-config": "{oops"})


def test_the_server_app_builds_its_settings_from_the_run_config(tmp_path: Path) -> None:
    from fedvault.app.provision import provision
    from fedvault.coordinator.server_app import settings_from_run_config
    from fedvault.kit import Kit

    example = Path(__file__).resolve().parents[2] / "examples" / "consortium.toml"
    kit = Kit.load(provision(example, tmp_path / "kits").coordinator_kit)
    state = tmp_path / "state"
    run = RunSettings(
        job=JOB, store="sqlite://", state_dir=state, custodian=kit.custodian, kit=kit.root
    )
    settings = settings_from_run_config(_context(run.to_flower()))
    assert (settings.job, settings.store_url, settings.report_dir) == (JOB, "sqlite://", state)
    assert (settings.custodian, settings.consortium) == (kit.custodian, kit.consortium)
    assert settings.key_directory is not None and settings.public_context is None
    assert settings.at_rest_key == kit.at_rest_key()  # read from the kit, never sent
    assert settings.task.task.name == "breast-cancer"
