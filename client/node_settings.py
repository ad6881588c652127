"""What the hospital daemon hands its ClientApp through Flower's node config.

The daemon (:mod:`fedvault.client.daemon`) builds a :class:`NodeSettings` and starts
the SuperNode with :meth:`NodeSettings.to_flower` as ``--node-config``; Flower starts
a fresh ClientApp process per message, which reads it back with
:meth:`NodeSettings.from_context` (:mod:`fedvault.client.kit_sites`). Both ends are
the hospital's, so the keys live here, once. Light at import: no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedvault.client.policy import POLICY_FILE
from fedvault.errors import InvalidConfigError
from fedvault.flower_env import ConfigValue

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = ["NODE_CONFIG_KEYS", "NodeSettings"]

#: The keys every hospital's node config must hold (the others are optional).
NODE_CONFIG_KEYS = ("kit", "data", "state-dir")


@dataclass(frozen=True)
class NodeSettings:
    """One hospital's node config.

    Its kit, data spec and state directory, and the optional site policy file,
    device, memory cap and ε budget.

    ``policy`` ``None``: ``state_dir / policy.toml`` (:attr:`policy_path`).
    ``epsilon_budget`` / ``max_physical_batch`` ``None``: not set (the job's ε, the
    whole batch); as before, a 0 read back from the node config also means not set.
    """

    kit: Path
    data: Path
    state_dir: Path
    policy: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_physical_batch: int | None = None
    epsilon_budget: float | None = None

    @property
    def policy_path(self) -> Path:
        """The site policy file this hospital applies."""
        return self.policy or self.state_dir / POLICY_FILE

    def to_flower(self) -> dict[str, ConfigValue]:
        """The node config the SuperNode is started with (``--node-config``)."""
        config: dict[str, ConfigValue] = {
            "kit": str(self.kit),
            "data": str(self.data),
            "state-dir": str(self.state_dir),
        }
        if self.policy is not None:
            config["policy"] = str(self.policy)
        config["device"] = self.device
        if self.max_physical_batch is not None:
            config["max-physical-batch"] = int(self.max_physical_batch)
        if self.epsilon_budget is not None:
            config["epsilon-budget"] = float(self.epsilon_budget)
        return config

    @classmethod
    def from_flower(cls, config: Mapping[str, ConfigValue]) -> NodeSettings:
        """Read a node config back.

        Raises
        ------
        InvalidConfigError
            A required key is missing or empty (the SuperNode was not started by
            ``fedvault client start``), or a value has the wrong type.
        """
        missing = [k for k in NODE_CONFIG_KEYS if not str(config.get(k, ""))]
        if missing:
            raise InvalidConfigError(
                f"node config lacks {missing}; start hospitals with `fedvault client start`"
            )

        def text(key: str, default: str = "") -> str:
            value = config.get(key, default)
            if not isinstance(value, str):
                raise _wrong(key, value, "a string")
            return value

        def number(key: str) -> float | None:
            value = config.get(key)
            if isinstance(value, str):  # as a TOML string: read as before, if it is a number
                try:
                    value = float(value) if value.strip() else None
                except ValueError:
                    raise _wrong(key, value, "a number") from None
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise _wrong(key, value, "a number")
            return float(value) if value else None  # 0, like an absent key: not set

        batch = number("max-physical-batch")
        if batch is not None and batch != int(batch):
            raise _wrong("max-physical-batch", config["max-physical-batch"], "a whole number")
        policy = text("policy")
        return cls(
            kit=Path(text("kit")),
            data=Path(text("data")),
            state_dir=Path(text("state-dir")),
            policy=Path(policy) if policy else None,
            device=text("device", "auto"),
            max_physical_batch=None if batch is None else int(batch),
            epsilon_budget=number("epsilon-budget"),
        )

    @classmethod
    def from_context(cls, context: Context) -> NodeSettings:
        """The settings of the SuperNode a ClientApp runs under."""
        return cls.from_flower(context.node_config)


def _wrong(key: str, value: object, what: str) -> InvalidConfigError:
    return InvalidConfigError(
        f"node config {key} must be {what} (got {value!r}, {type(value).__name__}); "
        "start hospitals with `fedvault client start`"
    )
