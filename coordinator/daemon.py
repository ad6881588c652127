"""``fedvault coordinator start``: the consortium operator's long-running service.

It supervises, in order:

1. the round store (opened first: a ``--job`` that conflicts with the store is
   refused before any port opens);
2. Flower's SuperLink with TLS, SuperNode authentication and a persistent
   ``--database``, behind the Fleet gateway that is the only public listener
   (the Control API stays on loopback: see coordinator/superlink.py);
3. enrolment: every hospital node key in the kit is registered, nothing else;
4. the operator API (gRPC, mutual TLS, role from the client certificate), which
   also takes jobs (``SubmitJob``, :class:`~.operator_api.JobIntake`);
5. the job queue, until SIGTERM: jobs run one after another on the same
   SuperLink and hospitals (:meth:`RoundStore.job_queue`: a job left running by
   an earlier start first, then the queued ones in order). Each job is
   submitted with ``flwr run``; if the run dies (SuperLink restart, ServerApp
   crash) it is submitted again and resumes from the store's last committed
   round; an operator's stop ends its run. Each ended job's report goes to
   ``STATE/reports/JOB/`` (the ServerApp keeps ``STATE/report.json`` for the
   latest job).

``--job FILE`` queues that job at start; ``exit_when_idle`` ends the service
once the queue is empty, with the last job's status (scripts, tests).
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
from typing import TYPE_CHECKING, Any

from fedvault.config import JobConfig
from fedvault.coordinator.metrics import CoordinatorExporter
from fedvault.coordinator.records import AuditEvent, Job
from fedvault.coordinator.round_events import RoundEventFollower
from fedvault.coordinator.run_settings import RUN_CONFIG_KEYS, RunSettings
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.coordinator.superlink import ControlApiError, SuperLinkConfig, SuperLinkProcess
from fedvault.coordinator.tracking import start_coordinator_tracker
from fedvault.errors import FedvaultError, InvalidConfigError, StoreError, TaskMismatchError
from fedvault.flower_env import app_pyproject
from fedvault.kit import Kit, KitKind
from fedvault.task_registry import describe

if TYPE_CHECKING:
    from fedvault.coordinator.operator_api import JobIntake

__all__ = [
    "RUN_CONFIG_KEYS",
    "CoordinatorOptions",
    "check_task_unchanged",
    "enrol_nodes",
    "load_job_file",
    "parse_job",
    "run_coordinator",
    "write_app_dir",
]

log = logging.getLogger("fedvault.coordinator")


def write_app_dir(path: Path) -> Path:
    """The Flower app `flwr run` submits; fedvault itself is installed on every party."""
    path.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f'{key} = ""' for key in RUN_CONFIG_KEYS)
    pyproject = app_pyproject(
        name="fedvault-job",
        description="fedvault consortium job (apps come from the installed fedvault package)",
        serverapp="fedvault.coordinator.server_app:app",
        clientapp="fedvault.client.client_app:app",
        config=config,
    )
    (path / "pyproject.toml").write_text(pyproject)
    return path


def load_job_file(path: Path) -> JobConfig:
    """A job TOML: ``[job]`` with name, task, hospitals, rounds, epsilon, ... .

    ``task`` names the task (an installed entry point or ``module:attribute``;
    ``example`` is accepted as its older name). Its training defaults come from
    the task itself, read in a child process (:func:`fedvault.task_registry.describe`)
    so this supervisor never loads torch.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InvalidConfigError(f"job file {path} not found") from None
    return _parse_job_toml(text, f"job file {path}")


def _parse_job_toml(text: str, source: str) -> JobConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfigError(f"{source} is not valid TOML: {exc}") from None
    fields: dict[str, Any] = dict(data.get("job", {}))
    if "task" in fields and "example" in fields:
        raise InvalidConfigError(f"{source}: give either task or example, not both")
    reference = fields.pop("task", None) or fields.pop("example", None)
    if not reference:
        raise InvalidConfigError(
            f"{source}: [job] needs task (an installed task's name, such as "
            '"breast-cancer", or "module:attribute")'
        )
    try:
        hospitals = int(fields.pop("hospitals"))
        rounds = int(fields.pop("rounds"))
    except KeyError as exc:
        raise InvalidConfigError(f"{source}: [job] needs {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(
            f"{source}: hospitals and rounds must be integers ({exc})"
        ) from None
    task = describe(str(reference))
    name = fields.pop("name", None)
    return JobConfig.for_task(
        task, hospitals=hospitals, rounds=rounds, job=name, reference=str(reference), **fields
    )


@dataclass(frozen=True)
class CoordinatorOptions:
    """How to run the coordinator daemon: its kit, first job, state, store and retry policy.

    ``job_file``: a job queued at start (``None``: wait for ``fedvault job submit``).
    ``exit_when_idle``: end once the queue is empty instead of serving until stopped.
    """

    kit_dir: Path
    job_file: Path | None
    state_dir: Path
    store_url: str | None = None
    max_resubmits: int = 5
    poll_s: float = 3.0
    exit_when_idle: bool = False
    metrics_port: int | None = None  # Prometheus /metrics; None: off
    metrics_host: str = "127.0.0.1"
    mlflow_uri: str | None = None  # MLflow tracking URI (coordinator/tracking.py); None: off
    dashboard_port: int | None = None  # web dashboard (coordinator/dashboard.py); None: off


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


def parse_job(job: str | JobConfig, kit: Kit, *, source: str = "the job file") -> JobConfig:
    """A job (a job file's text, or read already) as a job this consortium can run.

    Raises
    ------
    InvalidConfigError
        The TOML or a field is invalid, the task is unknown here, or the job
        wants more hospitals than the consortium enrols.
    """
    job = _parse_job_toml(job, source) if isinstance(job, str) else job
    if job.hospitals > len(kit.manifest.hospitals):
        raise InvalidConfigError(
            f"job wants {job.hospitals} hospitals but the consortium enrols "
            f"{len(kit.manifest.hospitals)}; lower hospitals in {source}"
        )
    return job


def _intake(kit: Kit, wake: threading.Event) -> JobIntake:
    from fedvault.coordinator.operator_api import JobIntake

    def validate(text: str) -> tuple[str, Mapping[str, object]]:
        job = parse_job(text, kit, source="the submitted job")
        return job.job, job.to_dict()

    return JobIntake(validate=validate, wake=wake.set)


@dataclass(frozen=True)
class _Service:
    """What the job queue runs jobs with."""

    link: SuperLinkProcess
    app_dir: Path
    state: Path
    store_url: str
    kit: Kit
    opts: CoordinatorOptions
    wake: threading.Event


def _superlink(kit: Kit, state: Path) -> SuperLinkProcess:
    return SuperLinkProcess(SuperLinkConfig.for_kit(kit, state / "superlink"))


def run_coordinator(opts: CoordinatorOptions, *, stop: threading.Event | None = None) -> str:
    """Serve the job queue until ``stop`` is set (or, ``exit_when_idle``, it is empty).

    Returns the status of the last job that ran (of ``opts.job_file``'s job when
    none ran; ``""`` when there was none).
    """
    from fedvault.coordinator.operator_api import serve

    stop = stop or threading.Event()
    kit = Kit.load(opts.kit_dir, expected_kind=KitKind.COORDINATOR)
    first = None if opts.job_file is None else parse_job(load_job_file(opts.job_file), kit)
    state = opts.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    store_url = opts.store_url or sqlite_url(state / DEFAULT_STORE_FILENAME)
    at_rest_key = kit.at_rest_key()
    last = ""
    with RoundStore(store_url, at_rest_key=at_rest_key) as store:
        if first is not None:  # refuses a conflicting job up front
            job_row = store.submit_job(first.job, first.to_dict())
            check_task_unchanged(store, job_row.id, describe(first.task).fingerprint_json)
            last = job_row.status
        store.append_audit(
            AuditEvent(
                kind="coordinator_started",
                actor="coordinator",
                detail={"job": first.job if first else None},
            )
        )
    link = _superlink(kit, state)
    api = tracker = board = None
    wake = threading.Event()
    metrics = CoordinatorExporter(store_url, state, opts.metrics_port, host=opts.metrics_host)
    try:
        metrics.prepare()  # before Flower starts: its app processes inherit the directory
        link.start()
        link.wait_healthy()
        with RoundStore(store_url, at_rest_key=at_rest_key) as store:
            enrol_nodes(link, kit.node_public_key_paths(), store)
        api = serve(store_url, kit, intake=_intake(kit, wake))
        log.info("operator API on %s", kit.operator_api_address)
        if opts.dashboard_port is not None:
            from fedvault.coordinator.dashboard import serve_dashboard

            board = serve_dashboard(store_url, kit, port=opts.dashboard_port)
        metrics.start()
        tracker = start_coordinator_tracker(opts.mlflow_uri, store_url, at_rest_key=at_rest_key)
        app_dir = write_app_dir(state / "app")
        service = _Service(link, app_dir, state, store_url, kit, opts, wake)
        return _serve_queue(service, stop) or last
    finally:
        if tracker is not None:
            tracker.stop()  # logs each job's end (and a none job's model), before the API goes
        metrics.stop()
        if board is not None:
            board.stop()
        if api is not None:
            api.stop(2).wait()
        link.stop()


def _serve_queue(service: _Service, stop: threading.Event) -> str:
    """Run queued jobs one after another; the last one's status ("" if none ran)."""
    last = ""
    while not stop.is_set():
        queue = _queue(service)
        if not queue:
            if service.opts.exit_when_idle:
                break
            service.wake.wait(service.opts.poll_s)  # a submission wakes it at once
            service.wake.clear()
            continue
        last = _run_queued(service, queue[0], stop)
    return last


def _queue(service: _Service) -> list[Job]:
    with RoundStore(service.store_url, at_rest_key=service.kit.at_rest_key()) as store:
        return store.job_queue()


def _run_queued(service: _Service, job_row: Job, stop: threading.Event) -> str:
    """Run one job of the queue to its end; a job that cannot run is marked failed."""
    at_rest_key = service.kit.at_rest_key()
    try:
        job = JobConfig.from_dict(job_row.config)
        fingerprint = describe(job.task).fingerprint_json
        with RoundStore(service.store_url, at_rest_key=at_rest_key) as store:
            check_task_unchanged(store, job_row.id, fingerprint)
            now = store.get_job(job_row.name)  # an operator may have stopped it meanwhile
            if now is None or now.status not in ("queued", "running"):
                return now.status if now is not None else "failed"
            if now.status == "queued":
                store.set_job_status(job_row.id, "running")
        log.info("job %s starts", job.job)
        # The kit's path, never the key: Flower keeps run config in its database.
        settings = RunSettings(
            job=job,
            store=service.store_url,
            state_dir=service.state,
            custodian=service.kit.custodian,
            kit=service.kit.root.resolve(),
        )
        status = _supervise_job(service.link, service.app_dir, settings, service.opts, stop)
    except (ControlApiError, StoreError):
        raise  # the SuperLink or the store is gone: the service cannot go on
    except FedvaultError as exc:
        log.error("job %s cannot run: %s", job_row.name, exc)
        with RoundStore(service.store_url, at_rest_key=at_rest_key) as store:
            store.append_audit(
                AuditEvent(kind="job_refused", actor="coordinator", detail={"reason": str(exc)}),
                job_id=job_row.id,
            )
            store.set_job_status(job_row.id, "failed")
        status = "failed"
    if status != "running":  # "running": the service was stopped; the job resumes next start
        log.info("job %s ended: %s", job_row.name, status)
        _write_job_report(service, job_row.name)
    return status


def _write_job_report(service: _Service, name: str) -> None:
    """``STATE/reports/JOB/report.json`` (and .png): every ended job keeps its own report."""
    from fedvault.coordinator.report import write_report

    try:
        with RoundStore(service.store_url, at_rest_key=service.kit.at_rest_key()) as store:
            write_report(store, name, service.state / "reports" / name)
    except (FedvaultError, OSError, ValueError) as exc:
        log.warning("could not write the report of job %s: %s", name, exc)


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
        if not _follow_run(link, run_id, store_url, job.job, opts.poll_s, stop):
            with contextlib.suppress(ControlApiError):
                link.control.stop_run(run_id)
    return _job_status(store_url, job.job)


def _follow_run(
    link: SuperLinkProcess,
    run_id: int,
    store_url: str,
    name: str,
    poll_s: float,
    stop: threading.Event,
) -> bool:
    """Wait for Flower run ``run_id`` to end; ``False`` when it must be stopped instead.

    It must when the service stops or an operator stopped the job.
    """
    events = RoundEventFollower(store_url, name)  # the ServerApp's round lines, in this log
    while not stop.is_set():
        try:
            run = link.control.run_status(run_id)
        except ControlApiError as exc:
            if link.is_running():
                raise
            log.warning("SuperLink unreachable (%s); restarting it", exc)
            link.restart()
            return True
        events.poll()
        if run.finished:
            if not run.succeeded:
                log.warning(
                    "run %d ended %s: %s; resubmitting to resume",
                    run_id,
                    run.sub_status,
                    run.details,
                )
            return True
        if _job_status(store_url, name) == "stopped":
            log.info("job %s stopped by an operator; stopping Flower run %d", name, run_id)
            return False
        stop.wait(poll_s)
    return False


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT end the daemon cleanly (children are stopped in ``finally``)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
