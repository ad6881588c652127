"""A real hospital as its ClientApp sees it: the provisioned kit, its data, its policy, its state.

The hospital daemon starts the SuperNode with ``--node-config`` naming the
paths (``kit``, ``data``, ``state-dir``, ``policy``); Flower starts a fresh
ClientApp process per message, so everything is re-read and re-verified each
time: a kit that was tampered with while the daemon ran is refused at the
next message, and an edited site policy applies from the next message on.

The job's task is resolved here, in the hospital's own environment (the
coordinator never ships code): an unknown task, one that fails to import, a
missing or unparsable policy, or data that does not fit the task's model is a
refusal with its reason, before anything trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedvault.client.data import DataSpec, load_task_data, validate_against_model
from fedvault.client.keys import KeyStore
from fedvault.client.policy import POLICY_FILE, SitePolicy
from fedvault.client.site import HospitalIdentity, HospitalSite
from fedvault.client.training import pick_device
from fedvault.config import JobConfig
from fedvault.fingerprint import fingerprint_task
from fedvault.kit import Kit, KitKind
from fedvault.privacy.errors import InvalidConfigError
from fedvault.task_registry import load_task

__all__ = ["NODE_CONFIG_KEYS", "KitSites"]

NODE_CONFIG_KEYS = ("kit", "data", "state-dir")


def _paths(context: Any) -> dict[str, Path]:
    cfg = context.node_config
    missing = [k for k in NODE_CONFIG_KEYS if not str(cfg.get(k, ""))]
    if missing:
        raise InvalidConfigError(
            f"node config lacks {missing}; start hospitals with `fedvault client start`"
        )
    paths = {k: Path(str(cfg[k])) for k in NODE_CONFIG_KEYS}
    paths["policy"] = Path(str(cfg.get("policy", "") or paths["state-dir"] / POLICY_FILE))
    return paths


class KitSites:
    """Resolves the one hospital this SuperNode serves."""

    def identity(self, context: Any) -> HospitalIdentity:
        paths = _paths(context)
        kit = Kit.load(paths["kit"], expected_kind=KitKind.HOSPITAL)
        return HospitalIdentity(name=kit.party, keys=KeyStore(paths["state-dir"]), kit=kit)

    def site(self, context: Any, job: JobConfig) -> HospitalSite:
        who = self.identity(context)
        paths = _paths(context)
        policy = SitePolicy.load(paths["policy"])  # no policy: nothing is allowed
        loaded = load_task(job.task)
        task = loaded.task
        data = load_task_data(task, DataSpec.load(paths["data"]))
        validate_against_model(data, task.build_model())
        budget = context.node_config.get("epsilon-budget")
        physical = context.node_config.get("max-physical-batch")
        return HospitalSite(
            name=who.name,
            state_dir=paths["state-dir"],
            train_data=data.train,
            test_data=data.test,
            task=task,
            fingerprint=fingerprint_task(task, loaded.module),
            keys=who.keys,
            device=pick_device(str(context.node_config.get("device", "auto"))),
            epsilon_budget=float(budget) if budget else None,
            kit=who.kit,
            policy=policy,
            max_physical_batch=int(physical) if physical else None,
        )
