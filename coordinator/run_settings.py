"""What the coordinator daemon hands its ServerApp through Flower's run config.

The daemon (:mod:`fedvault.coordinator.daemon`) builds a :class:`RunSettings` and
submits :meth:`RunSettings.to_flower` with ``flwr run``; the ServerApp that Flower
starts reads it back with :meth:`RunSettings.from_context`. Both ends are the
coordinator's, so the keys live here, once. This module stays light (no Flower,
torch or TenSEAL at import): the daemon is a supervisor and never loads the
ServerApp's stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedvault.config import JobConfig
from fedvault.errors import InvalidConfigError, StoreError
from fedvault.flower_env import ConfigValue

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = ["RUN_CONFIG_KEYS", "RunSettings"]

#: The run config keys, in the order they are written. The app's pyproject declares
#: each with an empty default (see ``daemon.write_app_dir``); a bare ``flwr run``
#: leaves them empty, and :meth:`RunSettings.from_flower` refuses that.
RUN_CONFIG_KEYS = ("job-config", "store", "state-dir", "custodian", "kit")


@dataclass(frozen=True)
class RunSettings:
    """One job's run config.

    The job, where its round store and state are, the key custodian, and the
    coordinator kit (its path: Flower keeps run config in its database, so the
    at-rest key is read from the kit by the ServerApp, never sent).
    """

    job: JobConfig
    store: str  # SQLAlchemy URL of the round store
    state_dir: Path
    custodian: str
    kit: Path

    def to_flower(self) -> dict[str, ConfigValue]:
        """The run config ``flwr run`` submits (``--run-config``).

        Its keys are :data:`RUN_CONFIG_KEYS`.
        """
        return {
            "job-config": self.job.to_json(),
            "store": self.store,
            "state-dir": str(self.state_dir),
            "custodian": self.custodian,
            "kit": str(self.kit),
        }

    @classmethod
    def from_flower(cls, config: Mapping[str, ConfigValue]) -> RunSettings:
        """Read a run config back.

        Raises
        ------
        StoreError
            A key is missing or empty: the run was not submitted by ``fedvault
            coordinator start``.
        InvalidConfigError
            A value is not a string, or ``job-config`` is not a valid job.
        """
        missing = [k for k in RUN_CONFIG_KEYS if not str(config.get(k, ""))]
        if missing:
            raise StoreError(
                f"run config lacks {missing}; submit jobs with `fedvault coordinator start`, "
                "not with a bare `flwr run`"
            )
        wrong = {k: config[k] for k in RUN_CONFIG_KEYS if not isinstance(config[k], str)}
        if wrong:
            got = ", ".join(f"{k} = {v!r} ({type(v).__name__})" for k, v in wrong.items())
            raise InvalidConfigError(f"run config values must be strings; got {got}")
        text = {k: str(config[k]) for k in RUN_CONFIG_KEYS}
        return cls(
            job=JobConfig.from_json(text["job-config"]),
            store=text["store"],
            state_dir=Path(text["state-dir"]),
            custodian=text["custodian"],
            kit=Path(text["kit"]),
        )

    @classmethod
    def from_context(cls, context: Context) -> RunSettings:
        """The settings of the run a ServerApp was started for."""
        return cls.from_flower(context.run_config)
