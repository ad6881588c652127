"""A hospital as its ClientApp sees it: name, state directory, data, keys.

The ClientApp does not know where its data comes from: a :class:`SiteProvider`
resolves the Flower context to a :class:`HospitalSite`. The simulation runner
provides virtual hospitals (partitions of a bundled data set); the production
daemon provides the hospital's own data and kit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from flwr.app import Context

from fedvault.client.keys import KeyStore
from fedvault.config import JobConfig
from fedvault.kit import Kit
from fedvault.task import Task

if TYPE_CHECKING:
    # Types only: a ClientApp process that answers a query (unmask, key ceremony)
    # must not pay torch's import (~1 s of CPU per message process).
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from fedvault.client.policy import SitePolicy
    from fedvault.fingerprint import TaskFingerprint

__all__ = ["HospitalIdentity", "HospitalSite", "SiteProvider"]


@dataclass(frozen=True)
class HospitalSite:
    """One hospital as a job sees it: its data, task, keys, device, policy and state."""

    name: str
    state_dir: Path  # the hospital's own ledger, keys and model versions live here
    train_data: Dataset
    test_data: Dataset
    task: Task
    fingerprint: TaskFingerprint  # this hospital's own fingerprint of the job's task
    keys: KeyStore  # secret HE contexts by key epoch
    device: torch.device
    epsilon_budget: float | None = None  # the hospital's own cap; None: the job's target
    kit: Kit | None = None  # deployment only: enables the key ceremony
    # What this hospital agreed to train. None only for the virtual hospitals of
    # `fedvault simulate`, which belong to the researcher who runs them.
    policy: SitePolicy | None = None
    # The most records one forward/backward pass may hold (memory); a larger
    # logical DP-SGD batch is split into virtual steps with the same ε.
    max_physical_batch: int | None = None
    # DP-SGD noise and Poisson batches from a CSPRNG (ChaCha20, keyed by the OS):
    # always in deployment. `fedvault simulate` may turn it off for seeded,
    # reproducible runs (torch's generator).
    secure_rng: bool = True

    @property
    def build_model(self) -> Callable[[], nn.Module]:
        """The task's model factory."""
        return self.task.build_model

    @property
    def ledger_path(self) -> Path:
        """The hospital's privacy ledger (SQLite) in its state directory."""
        return self.state_dir / "ledger.sqlite"


@dataclass(frozen=True)
class HospitalIdentity:
    """What the key ceremony needs: who the hospital is and where its keys live."""

    name: str
    keys: KeyStore
    kit: Kit | None

    @property
    def state_dir(self) -> Path:
        """The hospital's state directory (where its key store lives)."""
        return self.keys.root.parent  # the KeyStore lives in the state directory


class SiteProvider(Protocol):
    """Resolves the hospital a ClientApp serves, from its Flower context."""

    def site(self, context: Context, job: JobConfig) -> HospitalSite:
        """The hospital ready to run ``job``."""
        ...

    def identity(self, context: Context) -> HospitalIdentity:
        """Who the hospital is and where its keys live (for the key ceremony)."""
        ...
