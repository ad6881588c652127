"""``fedvault client start``: the hospital's daemon.

It verifies the hospital's kit, loads and validates its data *before* the first
round (a refusal names the file, column and fix), then supervises Flower's
SuperNode: outbound TLS to the coordinator only, authenticated with the
hospital's enrolled node key, restarted with backoff whenever it exits.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from fedvault.client.data import DataSpec, load_hospital_data
from fedvault.client.metrics import HospitalExporter, LedgerCollector
from fedvault.client.node_settings import NodeSettings
from fedvault.client.policy import POLICY_FILE, SitePolicy
from fedvault.client.supernode import SuperNodeConfig, SuperNodeSupervisor
from fedvault.client.training import pick_device
from fedvault.errors import InvalidConfigError
from fedvault.flower_env import free_port
from fedvault.kit import Kit, KitKind

__all__ = ["ClientOptions", "run_client"]

log = logging.getLogger("fedvault.client")


@dataclass(frozen=True)
class ClientOptions:
    """How to run one hospital's daemon: its kit, data spec, state directory and node settings."""

    kit_dir: Path
    data: Path
    state_dir: Path
    runtime_port: int = 0  # 0: pick a free loopback port
    epsilon_budget: float | None = None
    policy: Path | None = None  # None: state_dir / policy.toml
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_physical_batch: int | None = None  # memory cap on one pass; None: the whole batch
    metrics_port: int | None = None  # Prometheus /metrics; None: off
    metrics_host: str = "127.0.0.1"


def run_client(opts: ClientOptions, *, stop: threading.Event) -> None:
    """Run until ``stop`` is set."""
    kit = Kit.load(opts.kit_dir, expected_kind=KitKind.HOSPITAL)
    spec = DataSpec.load(opts.data)
    data = load_hospital_data(spec, regression=not spec.labels)
    device = pick_device(opts.device)  # refuses a GPU this machine lacks, before round 1
    log.info("%s: data ok: %s; device %s", kit.party, data.summary, device)
    state = opts.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    policy_path = Path(opts.policy).resolve() if opts.policy else state / POLICY_FILE
    _announce_policy(kit.party, policy_path)
    if opts.max_physical_batch is not None and opts.max_physical_batch < 1:
        raise InvalidConfigError(
            f"--max-physical-batch must be >= 1 (got {opts.max_physical_batch})"
        )
    settings = NodeSettings(
        kit=Path(opts.kit_dir).resolve(),
        data=Path(opts.data).resolve(),
        state_dir=state,
        policy=policy_path,
        device=str(opts.device),
        max_physical_batch=opts.max_physical_batch,
        epsilon_budget=opts.epsilon_budget,
    )
    supervisor = SuperNodeSupervisor(
        SuperNodeConfig(
            superlink=kit.coordinator_address,
            root_certificates=kit.ca_path,
            private_key=kit.node_key_path,
            state_dir=state / "supernode",
            runtime_port=opts.runtime_port or free_port(),
            node_config=settings.to_flower(),
        )
    )
    collector = LedgerCollector(
        state, kit.party, epsilon_budget=opts.epsilon_budget, device=str(device)
    )
    with HospitalExporter(collector, opts.metrics_port, host=opts.metrics_host) as metrics:
        metrics.prepare()  # before the SuperNode starts: its app processes inherit the directory
        with supervisor:
            log.info("%s: SuperNode connecting to %s", kit.party, kit.coordinator_address)
            metrics.start()
            stop.wait()


def _announce_policy(hospital: str, path: Path) -> None:
    """Check the site policy before the first round.

    A file that does not parse stops the daemon (exit 2); a missing one is allowed,
    but nothing will train until it exists.
    """
    from fedvault.errors import PolicyRefusalError

    try:
        policy = SitePolicy.load(path)
    except PolicyRefusalError as exc:
        log.warning("%s: %s", hospital, exc)
        return
    allowed = ", ".join(t.name for t in policy.tasks) or "no task"
    log.info("%s: site policy %s allows %s", hospital, path, allowed)
