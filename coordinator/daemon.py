"""``fedvault coordinator start``: the consortium operator's long-running process.

It supervises, in order:

1. the round store (opened first: a job that conflicts with the store is
   refused before any port opens);
2. Flower's SuperLink with TLS, SuperNode authentication and a persistent
   ``--database``, behind the Fleet gateway that is the only public listener
   (the Control API stays on loopback: see coordinator/superlink.py);
3. enrolment: every hospital node key in the kit is registered, nothing else;
4. the operator API (gRPC, mutual TLS, role from the client certificate);
5. the job: submitted with ``flwr run``; if the run dies (SuperLink restart,
   ServerApp crash) it is submitted again and resumes from the store's last
   committed round.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvault.config import JobConfig
from fedvault.coordinator.records import AuditEvent
from fedvault.coordinator.run_settings import RUN_CONFIG_KEYS, RunSettings
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.coordinator.superlink import ControlApiError, SuperLinkConfig, SuperLinkProcess
from fedvault.errors import FedvaultError, InvalidConfigError, TaskMismatchError
from fedvault.flower_env import free_port
from fedvault.kit import Kit, KitKind
from fedvault.task_registry import describe

__all__ = [
    "RUN_CONFIG_KEYS",
    "CoordinatorOptions",
    "check_task_unchanged",
    "enrol_nodes",
    "load_job_file",
    "run_coordinator",
    "write_app_dir",
]

log = logging.getLogger("fedvault.coordinator")

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedvault-job"
version = "1.0.0"
description = "fedvault consortium job (apps come from the installed fedvault package)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedvault"

[tool.flwr.app.components]
serverapp = "fedvault.coordinator.server_app:app"
clientapp = "fedvault.client.client_app:app"

[tool.flwr.app.config]
{config}
"""


def write_app_dir(path: Path) -> Path:
    """The Flower app `flwr run` submits; fedvault itself is installed on every party."""
    path.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f'{key} = ""' for key in RUN_CONFIG_KEYS)
    (path / "pyproject.toml").write_text(APP_PYPROJECT.format(config=config))
    return path


def load_job_file(path: Path) -> JobConfig:
    """A job TOML: ``[job]`` with name, task, hospitals, rounds, epsilon, ... .

    ``task`` names the task (an installed entry point or ``module:attribute``;
    ``example`` is accepted as its older name). Its training defaults come from
    the task itself, read in a child process (:func:`fedvault.task_registry.describe`)
    so this supervisor never loads torch.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidConfigError(f"job file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfigError(f"job file {path} is not valid TOML: {exc}") from None
    fields: dict[str, Any] = dict(data.get("job", {}))
    if "task" in fields and "example" in fields:
        raise InvalidConfigError(f"job file {path}: give either task or example, not both")
    reference = fields.pop("task", None) or fields.pop("example", None)
    if not reference:
        raise InvalidConfigError(
            f"job file {path}: [job] needs task (an installed task's name, such as "
            '"breast-cancer", or "module:attribute")'
        )
    try:
        hospitals = int(fields.pop("hospitals"))
        rounds = int(fields.pop("rounds"))
    except KeyError as exc:
        raise InvalidConfigError(f"job file {path}: [job] needs {exc}") from None
    task = describe(str(reference))
    name = fields.pop("name", None)
    return JobConfig.for_task(
        task, hospitals=hospitals, rounds=rounds, job=name, reference=str(reference), **fields
    )


@dataclass(frozen=True)
class CoordinatorOptions:
    """How to run the coordinator daemon: its kit, job file, state, store and retry policy."""

    kit_dir: Path
    job_file: Path
    state_dir: Path
    store_url: str | None = None
    max_resubmits: int = 5
    poll_s: float = 3.0


def check_task_unchanged(store: RoundStore, job_id: int, fingerprint_json: str) -> None:
    """Refuse to resume a job with other task code than it started with.

    The ServerApp records the task's fingerprint when the job starts; a
    coordinator that was upgraded (or patched) in between would otherwise
    average the old rounds' model into a different architecture or code.
    """
    from fedvault.fingerprint import TaskFingerprint

    ours = TaskFingerprint.from_json(fingerprint_json)
    started = [e for e in store.audit_events(job_id) if e.kind == "job_started"]
    recorded = started[0].detail.get("task_fingerprint") if started else None
    if isinstance(recorded, str) and recorded and recorded != ours.digest:
        version = started[0].detail.get("task_version") or "?"
        raise TaskMismatchError(
            f"job {started[0].job!r} started with task fingerprint {recorded} (version "
            f"{version}); this coordinator's task is {ours.describe()}, {ours.digest}. "
            "Reinstall the version the job started with, or start a new job"
        )


def enrol_nodes(link: SuperLinkProcess, keys: Mapping[str, Path], store: RoundStore) -> None:
    """Register each hospital's node key; record each enrolment once.

    Idempotent across restarts, and safe against a kill between registering a key
    at the SuperLink and recording it here: every (hospital, node id) the store
    does not hold yet is recorded, whether the key is new or was registered before.
    The ServerApp binds replies to hospitals from these records.
    """
    keys = dict(sorted(keys.items()))
    node_ids = link.control.register_nodes(list(keys.values()))
    recorded = {
        (str(e.detail.get("hospital")), e.detail.get("node_id"))
        for e in store.audit_events()
        if e.kind == "node_enrolled"
    }
    for hospital, pub in keys.items():
        node_id = node_ids[pub]
        if (hospital, node_id) in recorded:
            continue  # enrolled on an earlier start (the SuperLink database persists)
        store.append_audit(
            AuditEvent(
                kind="node_enrolled",
                actor="coordinator",
                detail={"hospital": hospital, "node_id": node_id},
            )
        )
        log.info("enrolled %s as node %d", hospital, node_id)


def run_coordinator(opts: CoordinatorOptions, *, stop: threading.Event | None = None) -> str:
    """Run the coordinator until the job ends (or ``stop`` is set); returns the job status."""
    from fedvault.coordinator.operator_api import serve

    stop = stop or threading.Event()
    kit = Kit.load(opts.kit_dir, expected_kind=KitKind.COORDINATOR)
    job = load_job_file(opts.job_file)
    if job.hospitals > len(kit.manifest.hospitals):
        raise InvalidConfigError(
            f"job wants {job.hospitals} hospitals but the consortium enrolls "
            f"{len(kit.manifest.hospitals)}"
        )
    state = opts.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    store_url = opts.store_url or sqlite_url(state / DEFAULT_STORE_FILENAME)
    at_rest_key = kit.at_rest_key()
    with RoundStore(store_url, at_rest_key=at_rest_key) as store:
        job_row = store.open_job(job.job, job.to_dict())  # refuses a conflicting job up front
        check_task_unchanged(store, job_row.id, describe(job.task).fingerprint_json)
        store.append_audit(
            AuditEvent(kind="coordinator_started", actor="coordinator", detail={"job": job.job})
        )
    host, _, port = kit.coordinator_address.rpartition(":")
    link = SuperLinkProcess(
        SuperLinkConfig(
            state_dir=state / "superlink",
            ca_certfile=kit.ca_path,
            certfile=kit.cert_path,
            keyfile=kit.key_path,
            fleet_host=host,
            fleet_port=int(port),
            control_port=free_port(),
        )
    )
    api = None
    try:
        link.start()
        link.wait_healthy()
        with RoundStore(store_url, at_rest_key=at_rest_key) as store:
            enrol_nodes(link, kit.node_public_key_paths(), store)
        api = serve(store_url, kit)
        log.info("operator API on %s", kit.operator_api_address)
        app_dir = write_app_dir(state / "app")
        # The kit's path, never the key: Flower keeps run config in its database.
        settings = RunSettings(
            job=job,
            store=store_url,
            state_dir=state,
            custodian=kit.custodian,
            kit=kit.root.resolve(),
        )
        return _supervise_job(link, app_dir, settings, opts, stop)
    finally:
        if api is not None:
            api.stop(2).wait()
        link.stop()


def _job_status(store_url: str, name: str) -> str:
    with RoundStore(store_url) as store:
        row = store.get_job(name)
        return row.status if row is not None else "running"


def _supervise_job(
    link: SuperLinkProcess,
    app_dir: Path,
    settings: RunSettings,
    opts: CoordinatorOptions,
    stop: threading.Event,
) -> str:
    store_url, job = settings.store, settings.job
    submits = 0
    while not stop.is_set():
        status = _job_status(store_url, job.job)
        if status in ("finished", "stopped", "failed"):
            return status
        if submits > opts.max_resubmits:
            raise FedvaultError(
                f"job {job.job!r} did not finish after {submits} submissions; see "
                f"{link.superlink_log} and the audit log"
            )
        if not link.is_running():
            log.warning("SuperLink exited; restarting it (runs and enrolments persist)")
            link.restart()
        run_id = link.control.submit_run(app_dir, settings.to_flower())
        submits += 1
        log.info("job %s submitted as Flower run %d (submission %d)", job.job, run_id, submits)
        while not stop.is_set():
            try:
                run = link.control.run_status(run_id)
            except ControlApiError as exc:
                if link.is_running():
                    raise
                log.warning("SuperLink unreachable (%s); restarting it", exc)
                link.restart()
                break
            if run.finished:
                if not run.succeeded:
                    log.warning(
                        "run %d ended %s: %s; resubmitting to resume",
                        run_id,
                        run.sub_status,
                        run.details,
                    )
                break
            stop.wait(opts.poll_s)
        else:
            with contextlib.suppress(ControlApiError):
                link.control.stop_run(run_id)
    return _job_status(store_url, job.job)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT end the daemon cleanly (children are stopped in ``finally``)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
