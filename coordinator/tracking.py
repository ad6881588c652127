"""Experiment tracking: follow a job in the round store and log it to MLflow.

The round store is the source of truth, so the tracker follows the store (a
thread polls it for newly committed rounds, as ``fedvault demo`` follows a job)
instead of hooking the ServerApp, which runs in another process. Each job gets
one MLflow run, named after the job and tagged with it and with the hash of the
job's first audit event, so a restarted coordinator re-attaches to the same run
(and a same-named job in another store gets its own). :class:`MlflowTracker`
follows one job (``fedvault simulate``); :class:`CoordinatorTracker` every job
a coordinator runs.

Logged: the job config flattened as parameters; per round (step = round number)
the pooled evaluation metrics (``accuracy``, ``loss``, ...: a round's model is
evaluated with the next round, so they arrive a round later), ``train_loss``,
``participants``, ``failed_attempts``, ``round_seconds``, ``bytes_received`` and
each hospital's cumulative ``epsilon.<hospital>``; at the end ``final.*``
metrics, ``report.json`` as an artifact and the final model as an MLflow
PyTorch model, where whoever logs it may read it: a ``none`` job's model is
plaintext in the store; an ``he`` job's only a hospital's key decrypts, so
unless the caller passes the decrypted weights in (``fedvault simulate`` holds
the simulated hospitals' keys) no model is logged and the run's
``fedvault.model`` tag says why.

MLflow is an optional extra (``fedvault[mlflow]``), imported only here and only
when tracking is asked for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from fedvault.errors import FedvaultError, InvalidConfigError

from .records import Job, RoundView
from .report import Report, RoundReport, build_report
from .store import RoundStore

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

__all__ = [
    "DEFAULT_EXPERIMENT",
    "TAG_JOB",
    "TAG_JOB_KEY",
    "TAG_MODEL",
    "TAG_MODEL_URI",
    "TAG_STATUS",
    "CoordinatorTracker",
    "MlflowTracker",
    "WeightsProvider",
    "flatten_params",
    "require_mlflow",
    "start_coordinator_tracker",
    "start_tracker",
]

log = logging.getLogger("fedvault.coordinator.tracking")

DEFAULT_EXPERIMENT = "fedvault"
TAG_JOB = "fedvault.job"
TAG_JOB_KEY = "fedvault.job_key"
TAG_MODEL = "fedvault.model"
TAG_MODEL_URI = "fedvault.model_uri"
TAG_STATUS = "fedvault.status"  # set once the job's end is logged
MODEL_NAME = "model"
INSTALL_HINT = "pip install 'fedvault[mlflow]'"
#: The run's MLflow status for each final job status.
_RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
_BATCH = 1000  # MLflow's most metrics per log_batch call
_PARAM_BATCH = 100  # and its most parameters

#: Returns the final model's weights (name -> array) the caller may read, or ``None``.
WeightsProvider = Callable[[], "Mapping[str, np.ndarray] | None"]


def require_mlflow() -> ModuleType:
    """Import MLflow, or fail with the one line that says how to install it.

    MLflow's anonymous usage telemetry is switched off (unless the environment
    says otherwise): a coordinator's experiments are nobody else's business.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
        import pandas  # noqa: F401  (mlflow.pytorch needs it; fail now, not at the job's end)
    except ImportError as exc:
        raise InvalidConfigError(
            f"--mlflow needs MLflow, which is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return mlflow


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A job config as MLflow parameters: nested keys joined with dots, values as text."""
    out: dict[str, str] = {}
    for key, value in sorted(config.items()):
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def _job_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The job's parameters, with the defaults a stored config leaves implicit spelt out."""
    params = flatten_params(config)
    params.setdefault("masking", "True")  # stored configs drop masking when it is on
    params["mode"] = str(config.get("secure_aggregation", "he"))
    return params


def _allow_file_store(uri: str) -> None:
    """Let a ``file:`` (or plain path) URI use MLflow's file store, as its caller asked.

    MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set;
    naming one explicitly is that opt-in.
    """
    scheme = uri.partition(":")[0] if ":" in uri else ""
    if scheme in ("", "file") or len(scheme) == 1:  # "C:\\..." is a path too
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _artifact_location(uri: str) -> str | None:
    """Beside a SQLite tracking database: MLflow's default is ``./mlruns`` in the cwd.

    ``None`` (MLflow's choice) for any other URI: a file store keeps artifacts
    inside itself, a tracking server has its own artifact root.
    """
    from pathlib import Path

    try:
        url = make_url(uri)
    except ArgumentError:  # not an SQLAlchemy URL: file:DIR, a plain path
        return None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return (Path(url.database).resolve().parent / "mlartifacts").as_uri()


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return max((later - earlier).total_seconds(), 0.0)


class MlflowTracker:
    """Follow one job in the round store and log it to one MLflow run.

    Parameters
    ----------
    tracking_uri
        Where MLflow keeps runs: ``file:DIR``, ``sqlite:///PATH`` or ``http(s)://HOST``.
    store_url
        The round store's URL.
    job_name
        The job to follow.
    at_rest_key
        The store's at-rest key (a ``none`` job's plaintext model is sealed with it).
    final_weights
        Returns the final model's decrypted weights for an ``he`` job (the
        caller holds a hospital's key), or ``None``. Without it a ``none`` job's
        model is read from the store and an ``he`` job's is not logged.
    poll_s
        Seconds between polls of the store.
    experiment
        MLflow experiment (default ``$MLFLOW_EXPERIMENT_NAME``, else ``fedvault``).

    Raises
    ------
    InvalidConfigError
        MLflow is not installed.
    """

    def __init__(
        self,
        tracking_uri: str,
        store_url: str,
        job_name: str,
        *,
        at_rest_key: bytes | None = None,
        final_weights: WeightsProvider | None = None,
        poll_s: float = 2.0,
        experiment: str | None = None,
    ) -> None:
        self._mlflow = require_mlflow()
        _allow_file_store(tracking_uri)
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self._store_url = store_url
        self._job_name = job_name
        self._at_rest_key = at_rest_key
        self._final_weights = final_weights
        self._poll_s = poll_s
        self._experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
        self._experiment = self._experiment or DEFAULT_EXPERIMENT
        self._experiment_id: str | None = None
        self.run_id: str | None = None
        self._committed = 0  # last round whose commit metrics are logged
        self._evaluated: set[int] = set()  # rounds whose evaluation is logged
        self._started: datetime | None = None
        self._finished = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------

    def start(self) -> MlflowTracker:
        """Reach the tracking server (failing now, not later), then poll in a thread."""
        self._experiment_id = self.ensure_experiment()
        self._thread = threading.Thread(
            target=self._loop, name=f"mlflow-{self._job_name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop polling, log what is left; close the run if the job has ended.

        A job that still runs (the coordinator is shutting down) leaves its run
        ``KILLED``; the next coordinator re-attaches and sets it running again.
        Tracking never fails the job: an MLflow error here is logged, not raised.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            status = self.sync(finish=True)
            if status is not None and status not in _RUN_STATUS and self.run_id is not None:
                self.client.set_terminated(self.run_id, "KILLED")
        except Exception as exc:  # MLflow raises many kinds; tracking is best effort
            log.warning("MLflow tracking of job %s: %s", self._job_name, exc)

    def __enter__(self) -> MlflowTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.sync()
            except Exception as exc:  # a tracking outage must not stop training
                log.warning("MLflow tracking of job %s (retrying): %s", self._job_name, exc)

    # -- one poll -------------------------------------------------------------

    def sync(self, *, finish: bool = False) -> str | None:
        """Log what the store committed since the last call.

        ``finish``: if the job has ended, also log its end and close the run
        (once). Only :meth:`stop` finishes, so a caller that writes the final
        model after the job ended (``fedvault simulate`` exports it) is not raced.
        Returns the job's status (``None`` while the store has no such job).
        """
        with self._lock:
            if self._finished:
                return None
            with RoundStore(self._store_url, at_rest_key=self._at_rest_key) as store:
                job = store.get_job(self._job_name)
                if job is None:
                    return None
                if self.run_id is None:
                    self._attach(store, job)
                if self._finished:  # a run whose end was logged before (a re-run of an ended job)
                    return job.status
                report = build_report(store, job.name)
                views = store.rounds(job.id)
                if self._started is None and report.rounds:
                    self._started = _job_started(store, job)
                self._log_rounds(report, views)
                if finish and job.status in _RUN_STATUS:
                    self._finish(store, job, report, views)
                return job.status

    def ensure_experiment(self) -> str:
        """The experiment's id, created if missing (this reaches the tracking server)."""
        found = self.client.get_experiment_by_name(self._experiment)
        if found is not None:
            return str(found.experiment_id)
        where = _artifact_location(self.tracking_uri)
        return str(self.client.create_experiment(self._experiment, artifact_location=where))

    def _attach(self, store: RoundStore, job: Job) -> None:
        """Find the job's run (a coordinator restart) or create it with the job's parameters."""
        if self._experiment_id is None:
            self._experiment_id = self.ensure_experiment()
        key = _job_key(store, job)
        found = self.client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{TAG_JOB}` = '{job.name}' and tags.`{TAG_JOB_KEY}` = '{key}'",
            max_results=1,
        )
        if found:
            self.run_id = str(found[0].info.run_id)
            if found[0].data.tags.get(TAG_STATUS) == job.status:
                self._finished = True  # nothing happened since its end was logged
                return
            self.client.update_run(self.run_id, status="RUNNING")
            self._recover_progress()
            log.info("MLflow: job %s re-attached to run %s", job.name, self.run_id)
            return
        tags = {
            TAG_JOB: job.name,
            TAG_JOB_KEY: key,
            "fedvault.task": str(job.config.get("task", "")),
            "fedvault.mode": str(job.config.get("secure_aggregation", "he")),
            "fedvault.store": make_url(self._store_url).render_as_string(hide_password=True),
        }
        run = self.client.create_run(self._experiment_id, run_name=job.name, tags=tags)
        self.run_id = str(run.info.run_id)
        self._log_params(_job_params(job.config))
        log.info("MLflow: job %s logs to run %s at %s", job.name, self.run_id, self.tracking_uri)

    def _recover_progress(self) -> None:
        """What a previous coordinator logged already, so that nothing is logged twice."""
        assert self.run_id is not None
        history = self.client.get_metric_history
        self._committed = max((m.step for m in history(self.run_id, "participants")), default=0)
        self._evaluated = {m.step for m in history(self.run_id, "loss")}

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        assert self.run_id is not None
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_BATCH])

    def _log_metrics(self, values: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v, step in values]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def _log_rounds(self, report: Report, views: Sequence[RoundView]) -> None:
        committed = {v.number: v for v in views if v.status == "committed"}
        values: list[tuple[str, float, int]] = []
        newly_evaluated: list[int] = []
        for r in report.rounds:
            if r.round > self._committed:
                failed = sum(1 for v in views if v.status == "failed" and v.number == r.round)
                previous = committed.get(r.round - 1)
                since = previous.committed_at if previous is not None else self._started
                seconds = _seconds(committed[r.round].committed_at, since)
                values += [(k, v, r.round) for k, v in _commit_metrics(r, failed, seconds).items()]
            if r.round not in self._evaluated and r.loss is not None:
                values += [(k, v, r.round) for k, v in _eval_metrics(r).items()]
                newly_evaluated.append(r.round)
        if values:
            self._log_metrics(values)
        self._committed = max([self._committed, *(r.round for r in report.rounds)])
        self._evaluated.update(newly_evaluated)

    # -- the end of the job -----------------------------------------------------

    def _finish(
        self, store: RoundStore, job: Job, report: Report, views: Sequence[RoundView]
    ) -> None:
        """Final metrics, report.json and (where readable) the model; then close the run."""
        assert self.run_id is not None
        final = report.final
        values = {f"final.{k}": v for k, v in final.metrics.items()}
        values["final.rounds_completed"] = float(final.rounds_completed)
        values["final.failed_attempts"] = float(sum(v.status == "failed" for v in views))
        if final.epsilon_max is not None:
            values["final.epsilon_max"] = final.epsilon_max
        self._log_metrics((k, v, final.rounds_completed) for k, v in sorted(values.items()))
        self.client.log_dict(self.run_id, report.to_json(), "report.json")
        self.client.set_tag(self.run_id, TAG_STATUS, job.status)
        if final.rounds_completed:
            try:
                self._log_final_model(store, job)
            except Exception as exc:  # the run is still worth closing (e.g. task not installed)
                log.warning("MLflow: the final model of job %s was not logged: %s", job.name, exc)
                self.client.set_tag(self.run_id, TAG_MODEL, f"not logged: {exc}"[:5000])
        self.client.set_terminated(self.run_id, _RUN_STATUS[job.status])
        self._finished = True

    def _log_final_model(self, store: RoundStore, job: Job) -> None:
        weights = self._final_weights() if self._final_weights is not None else None
        assert self.run_id is not None
        if weights is None:
            latest = store.latest_model(job.id)
            if latest is None or latest.kind != "plain":
                self.client.set_tag(
                    self.run_id,
                    TAG_MODEL,
                    "not logged: he mode, the coordinator holds only ciphertext it cannot "
                    "decrypt; export it at a hospital (fedvault model export --state)",
                )
                return
            from fedvault.npz import arrays_from_bytes

            weights = arrays_from_bytes(latest.blob)
        uri = self._log_torch_model(job, weights)
        self.client.set_tag(self.run_id, TAG_MODEL, "logged")
        self.client.set_tag(self.run_id, TAG_MODEL_URI, uri)

    def _log_torch_model(self, job: Job, weights: Mapping[str, np.ndarray]) -> str:
        """Log the task's model with ``weights`` as an MLflow PyTorch model; its URI.

        Saved as a ``pt2`` program (no pickled code) traced on a few rows of the
        task's reference data; a task without reference data, or whose model
        cannot be traced, is pickled instead (loading it then needs the task
        installed).
        """
        import mlflow.pytorch
        import torch

        from fedvault.task_registry import load_task

        task = load_task(str(job.config["task"])).task
        model = _model_with(task.build_model(), weights)
        example = _input_example(task, int(job.config.get("seed", 0)))
        requirements = [f"torch=={torch.__version__.split('+')[0]}"]
        self._mlflow.set_tracking_uri(self.tracking_uri)
        with self._mlflow.start_run(run_id=self.run_id):
            if example is not None:
                try:
                    info = mlflow.pytorch.log_model(
                        model,
                        name=MODEL_NAME,
                        input_example=example,
                        serialization_format="pt2",
                        pip_requirements=requirements,
                    )
                    return str(info.model_uri)
                except Exception as exc:  # torch.export fails in many ways
                    log.warning("MLflow: model not traceable (%s); pickling it instead", exc)
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, serialization_format="pickle", pip_requirements=requirements
            )
            return str(info.model_uri)


def _commit_metrics(r: RoundReport, failed: int, seconds: float | None) -> dict[str, float]:
    """What a committed round's row says: who took part, what it cost, ε per hospital."""
    out = {
        "participants": float(len(r.participants)),
        "failed_attempts": float(failed),
        "bytes_received": float(r.bytes_received),
    }
    if seconds is not None:
        out["round_seconds"] = seconds
    if r.train_loss is not None:
        out["train_loss"] = r.train_loss
    out.update({f"epsilon.{h}": eps for h, eps in r.epsilon.items()})
    if r.epsilon:
        out["epsilon_max"] = max(r.epsilon.values())
    return out


def _eval_metrics(r: RoundReport) -> dict[str, float]:
    """The round's pooled evaluation: accuracy, loss and the task's metrics."""
    out = {k: float(v) for k, v in r.metrics.items()}
    if r.accuracy is not None:
        out["accuracy"] = r.accuracy
    if r.loss is not None:
        out["loss"] = r.loss
    return out


def _job_key(store: RoundStore, job: Job) -> str:
    """What tells this job from a same-named one in another store: its first audit hash."""
    events = store.audit_events(job.id)
    return events[0].hash if events else str(job.id)  # the job.created event


def _job_started(store: RoundStore, job: Job) -> datetime | None:
    """When the job first started (round 1's clock starts there)."""
    events = store.audit_events(job.id)
    started = [e.created_at for e in events if e.kind == "job_started"]
    return started[0] if started else (events[0].created_at if events else None)


def _model_with(model: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    """``model`` holding ``weights`` (all of its state, or its shared part)."""
    import torch

    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise FedvaultError(
            f"the final model's weights {unknown[:3]} are not in the task's model; "
            "the job's task changed since it ran: reinstall the version it ran with"
        )
    model.load_state_dict(state, strict=len(state) == len(model.state_dict()))
    return model.eval()


def _input_example(task: Any, seed: int) -> np.ndarray | None:
    """A few rows of the task's reference test data (``None`` without tensor rows)."""
    import torch

    if task.load_data is None:
        return None
    _, test = task.load_data(seed)
    rows = [test[i][0] for i in range(min(5, len(test)))]
    if not rows or not all(isinstance(row, torch.Tensor) for row in rows):
        return None
    example: np.ndarray = torch.stack(rows).numpy()
    return example


class CoordinatorTracker:
    """Follow every job a coordinator runs, each into its own MLflow run.

    A job is followed from the first poll that sees it ``running`` (a job still
    running after a restart is re-attached to its run); once it has ended its
    run is finished. Jobs that ended before this coordinator started are left
    as they are.

    Parameters
    ----------
    tracking_uri, store_url, at_rest_key, poll_s
        As for :class:`MlflowTracker`.
    """

    def __init__(
        self,
        tracking_uri: str,
        store_url: str,
        *,
        at_rest_key: bytes | None = None,
        poll_s: float = 2.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._store_url = store_url
        self._at_rest_key = at_rest_key
        self._poll_s = poll_s
        self.jobs: dict[str, MlflowTracker] = {}
        self._probe = MlflowTracker(tracking_uri, store_url, "")  # reaches the experiment
        self._adopted = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _follow(self, name: str) -> MlflowTracker:
        if name not in self.jobs:
            self.jobs[name] = MlflowTracker(
                self.tracking_uri, self._store_url, name, at_rest_key=self._at_rest_key
            )
        return self.jobs[name]

    def start(self) -> CoordinatorTracker:
        """Reach the tracking server now (a bad URI fails the start), then poll in a thread."""
        self._probe.ensure_experiment()
        self._thread = threading.Thread(target=self._loop, name="mlflow-jobs", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> None:
        """Pick up jobs that run now; log every followed job's news; finish ended ones."""
        with RoundStore(self._store_url, at_rest_key=self._at_rest_key) as store:
            jobs = store.list_jobs()
            running = [job.name for job in jobs if job.status == "running"]
            if not self._adopted:
                running += self._left_open(store, jobs)
                self._adopted = True
        for name in running:
            self._follow(name)
        for tracker in list(self.jobs.values()):
            tracker.sync(finish=True)

    def _left_open(self, store: RoundStore, jobs: Sequence[Job]) -> list[str]:
        """Jobs of this store whose run a previous coordinator left open.

        Their job may have ended while no coordinator followed it (its end is then
        logged now), or still runs (followed again).
        """
        client, experiment = self._probe.client, self._probe.ensure_experiment()
        keys: dict[str, str] = {}
        for status in ("RUNNING", "KILLED"):  # a stopped job's run is KILLED too, but tagged
            found = client.search_runs(
                [experiment], filter_string=f"attributes.status = '{status}'", max_results=1000
            )
            for run in found:
                tags = run.data.tags
                if TAG_STATUS not in tags and TAG_JOB in tags:
                    keys[str(tags[TAG_JOB])] = str(tags.get(TAG_JOB_KEY))
        return [j.name for j in jobs if j.name in keys and keys[j.name] == _job_key(store, j)]

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.poll()
            except Exception as exc:  # a tracking outage must not stop the coordinator
                log.warning("MLflow tracking (retrying): %s", exc)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop polling; log what is left of each job (a running one's run is left KILLED)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for tracker in self.jobs.values():
            tracker.stop(timeout_s)


def start_tracker(
    tracking_uri: str | None,
    store_url: str,
    job_name: str,
    *,
    at_rest_key: bytes | None = None,
    final_weights: WeightsProvider | None = None,
) -> MlflowTracker | None:
    """A started tracker for ``job_name``, or ``None`` when no tracking URI is given."""
    if not tracking_uri:
        return None
    tracker = MlflowTracker(
        tracking_uri, store_url, job_name, at_rest_key=at_rest_key, final_weights=final_weights
    )
    try:
        return tracker.start()
    except FedvaultError:
        raise
    except Exception as exc:  # MLflow's errors: a bad URI, an unreachable server, ...
        raise InvalidConfigError(_unusable(tracking_uri, exc)) from exc


def _unusable(tracking_uri: str, exc: Exception) -> str:
    return (
        f"--mlflow {tracking_uri}: MLflow cannot use it ({exc}); pass a reachable tracking "
        "URI such as file:DIR, sqlite:///PATH or http://HOST:5000"
    )


def start_coordinator_tracker(
    tracking_uri: str | None, store_url: str, *, at_rest_key: bytes | None = None
) -> CoordinatorTracker | None:
    """A started tracker of every job the coordinator runs, or ``None`` without a URI."""
    if not tracking_uri:
        return None
    try:
        return CoordinatorTracker(tracking_uri, store_url, at_rest_key=at_rest_key).start()
    except FedvaultError:
        raise
    except Exception as exc:  # MLflow's errors: a bad URI, an unreachable server, ...
        raise InvalidConfigError(_unusable(tracking_uri, exc)) from exc
