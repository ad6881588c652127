"""A real hospital as its ClientApp sees it: the provisioned kit, its data, its policy, its state.

The hospital daemon starts the SuperNode with ``--node-config`` naming the
paths (``kit``, ``data``, ``state-dir``, ``policy``; see
:mod:`fedvault.client.node_settings`); Flower starts a fresh ClientApp process
per message, so everything is re-read and re-verified each time: a kit that was
tampered with while the daemon ran is refused at the next message, and an
edited site policy applies from the next message on.

The job's task is resolved here, in the hospital's own environment (the
coordinator never ships code): an unknown task, one that fails to import, a
missing or unparsable policy, or data that does not fit the task's model is a
refusal with its reason, before anything trains.
"""

from __future__ import annotations

from flwr.app import Context

from fedvault.client.keys import KeyStore
from fedvault.client.node_settings import NODE_CONFIG_KEYS, NodeSettings
from fedvault.client.policy import SitePolicy
from fedvault.client.site import HospitalIdentity, HospitalSite
from fedvault.config import JobConfig
from fedvault.fingerprint import fingerprint_task
from fedvault.kit import Kit, KitKind
from fedvault.task_registry import load_task

__all__ = ["NODE_CONFIG_KEYS", "KitSites"]


class KitSites:
    """Resolves the one hospital this SuperNode serves."""

    def identity(self, context: Context) -> HospitalIdentity:
        """The hospital named by the node config's kit, with its key store."""
        node = NodeSettings.from_context(context)
        kit = Kit.load(node.kit, expected_kind=KitKind.HOSPITAL)
        return HospitalIdentity(name=kit.party, keys=KeyStore(node.state_dir), kit=kit)

    def site(self, context: Context, job: JobConfig) -> HospitalSite:
        """The hospital ready to run ``job``: its policy, task, checked data and device."""
        # Imported here: they load torch, which a query (unmask, key ceremony) never needs.
        from fedvault.client.data import DataSpec, load_task_data, validate_against_model
        from fedvault.client.training import pick_device

        who = self.identity(context)
        node = NodeSettings.from_context(context)
        policy = SitePolicy.load(node.policy_path)  # no policy: nothing is allowed
        loaded = load_task(job.task)
        task = loaded.task
        data = load_task_data(task, DataSpec.load(node.data))
        validate_against_model(data, task.build_model())
        return HospitalSite(
            name=who.name,
            state_dir=node.state_dir,
            train_data=data.train,
            test_data=data.test,
            task=task,
            fingerprint=fingerprint_task(task, loaded.module),
            keys=who.keys,
            device=pick_device(node.device),
            epsilon_budget=node.epsilon_budget,
            kit=who.kit,
            policy=policy,
            max_physical_batch=node.max_physical_batch,
        )
