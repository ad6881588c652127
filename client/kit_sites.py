"""A real hospital as its ClientApp sees it: the provisioned kit, its data, its state.

The hospital daemon starts the SuperNode with ``--node-config`` naming three
paths (``kit``, ``data``, ``state-dir``); Flower starts a fresh ClientApp process
per message, so everything is re-read and re-verified each time — a kit that
was tampered with while the daemon ran is refused at the next message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedvault.client.data import DataSpec, load_hospital_data, validate_against_model
from fedvault.client.keys import KeyStore
from fedvault.client.site import HospitalIdentity, HospitalSite
from fedvault.client.training import pick_device
from fedvault.config import JobConfig
from fedvault.kit import Kit, KitKind
from fedvault.privacy.errors import InvalidConfigError

__all__ = ["NODE_CONFIG_KEYS", "KitSites"]

NODE_CONFIG_KEYS = ("kit", "data", "state-dir")


def _paths(context: Any) -> dict[str, Path]:
    cfg = context.node_config
    missing = [k for k in NODE_CONFIG_KEYS if not str(cfg.get(k, ""))]
    if missing:
        raise InvalidConfigError(
            f"node config lacks {missing}; start hospitals with `fedvault client start`"
        )
    return {k: Path(str(cfg[k])) for k in NODE_CONFIG_KEYS}


class KitSites:
    """Resolves the one hospital this SuperNode serves."""

    def identity(self, context: Any) -> HospitalIdentity:
        paths = _paths(context)
        kit = Kit.load(paths["kit"], expected_kind=KitKind.HOSPITAL)
        return HospitalIdentity(name=kit.party, keys=KeyStore(paths["state-dir"]), kit=kit)

    def site(self, context: Any, job: JobConfig) -> HospitalSite:
        from fedvault.examples import get_example

        who = self.identity(context)
        paths = _paths(context)
        data = load_hospital_data(DataSpec.load(paths["data"]))
        build_model = get_example(job.example).build_model
        validate_against_model(data, build_model())
        budget = context.node_config.get("epsilon-budget")
        return HospitalSite(
            name=who.name,
            state_dir=paths["state-dir"],
            train_data=data.train,
            test_data=data.test,
            build_model=build_model,
            keys=who.keys,
            device=pick_device(),
            epsilon_budget=float(budget) if budget else None,
            kit=who.kit,
        )
