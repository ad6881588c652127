"""``fedvault simulate``: a virtual consortium on Flower's simulation runtime.

The researcher's entry point runs the *production* ServerApp and ClientApp; only
the surroundings are simulated: each virtual hospital is a partition of a
bundled data set with its own state directory (ledger, HE secret context),
and the runner plays the key custodian, generating the HE context once and
giving the coordinator only its public part.

Output, all under ``out_dir``: ``report.json`` and ``report.png`` (rewritten
after every committed round), the SQLite round store, and ``hospitals/*``.
Re-running with the same ``out_dir`` and settings resumes the job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedvault.client.client_app import make_client_app
from fedvault.client.keys import KeyStore
from fedvault.client.masking import provision_seal_keys
from fedvault.client.site import HospitalIdentity, HospitalSite
from fedvault.client.training import pick_device
from fedvault.config import JobConfig
from fedvault.coordinator.records import RoundView
from fedvault.coordinator.report import REPORT_JSON, Report
from fedvault.coordinator.server_app import CoordinatorSettings, make_server_app
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.coordinator.tracking import require_mlflow, start_tracker
from fedvault.durable import fsync_dir
from fedvault.errors import InvalidConfigError
from fedvault.fingerprint import fingerprint_task
from fedvault.json_types import JSONObject
from fedvault.partition import Partition, partition_indices
from fedvault.privacy.he_context import HeContext
from fedvault.task import Task
from fedvault.task_registry import LoadedTask, load_task

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = ["SimulatedSites", "hospital_name", "noise_source", "run_cli", "simulate"]

PUBLIC_CONTEXT = Path("coordinator") / "he-public.ctx"
SIMULATION_KEY_EPOCH = 0


def hospital_name(index: int) -> str:
    """The simulated hospital of partition ``index``: ``hospital-(index+1)``."""
    return f"hospital-{index + 1}"


@dataclass(frozen=True)
class SimulatedSites:
    """Virtual hospitals: partition ``i`` of the task's reference data is ``hospital-(i+1)``.

    Picklable (Ray ships it to worker processes); data and keys are loaded once
    per worker and cached. They belong to the researcher running the
    simulation, so they train without a site policy; the task fingerprint is
    still checked, as in deployment. ``secure_rng``: DP-SGD noise and Poisson
    batches from the CSPRNG, as deployed hospitals draw them; off (the
    default), from torch's generator seeded by the job's seed, so that a run
    is reproducible.
    """

    loaded: LoadedTask
    partition: Partition
    hospitals: int
    seed: int
    root: Path
    secure_rng: bool = False

    def site(self, context: Context, job: JobConfig) -> HospitalSite:
        """The virtual hospital of the node's partition, loaded once per worker."""
        index = int(context.node_config["partition-id"])
        key = (*self._key(), index, job.secure_aggregation)
        if key not in _SITES:
            _SITES[key] = self._load(index, job)
        return _SITES[key]

    def identity(self, context: Context) -> HospitalIdentity:
        """The virtual hospital of the node's partition, with its key store (no kit)."""
        name = hospital_name(int(context.node_config["partition-id"]))
        state_dir = self.root / "hospitals" / name
        return HospitalIdentity(name=name, keys=KeyStore(state_dir), kit=None)

    def _load(self, index: int, job: JobConfig) -> HospitalSite:
        import torch
        from torch.utils.data import Subset

        torch.set_num_threads(1)  # one Ray actor per core
        task = self.loaded.task
        train, test, parts, tests = self._split()
        name = hospital_name(index)
        state_dir = self.root / "hospitals" / name
        return HospitalSite(
            name=name,
            state_dir=state_dir,
            train_data=Subset(train, parts[index].tolist()),
            test_data=Subset(test, tests[index].tolist()),
            task=task,
            fingerprint=_fingerprint(self.loaded),
            keys=KeyStore(state_dir),
            device=pick_device(),
            secure_rng=self.secure_rng,
        )

    def _key(self) -> tuple[Any, ...]:
        """What identifies this simulation within a worker, by value.

        Not ``self``: Ray unpickles the ClientApp with every message, and a
        :class:`Task` compares by identity, so ``self`` never matched twice and
        every message loaded its hospital afresh.
        """
        loaded = self.loaded
        return (
            loaded.reference,
            loaded.module,
            self.partition,
            self.hospitals,
            self.seed,
            self.root,
            self.secure_rng,
        )

    def _split(self) -> tuple[Any, Any, list[Any], list[Any]]:
        """The reference data and every hospital's share of it, once per worker process.

        Loading and partitioning cost time in the number of hospitals; done
        for each hospital, a worker's share of the job grew quadratically.
        """
        key = self._key()
        if key not in _SPLITS:
            task = self.loaded.task
            train, test = _reference_data(task, self.seed)
            parts = partition_indices(
                _strata(task, train), self.hospitals, self.partition, seed=self.seed
            )
            # Test data is split evenly, so the pooled federated metrics are exactly
            # the metrics on the whole held-out set.
            tests = partition_indices(
                _strata(task, test),
                self.hospitals,
                Partition(kind="iid"),
                seed=self.seed,
                min_size=1,
            )
            _SPLITS.clear()  # one job per worker at a time
            _SPLITS[key] = (train, test, list(parts), list(tests))
        return _SPLITS[key]


_SITES: dict[tuple[Any, ...], HospitalSite] = {}
_SPLITS: dict[tuple[Any, ...], tuple[Any, Any, list[Any], list[Any]]] = {}
_FINGERPRINTS: dict[str, Any] = {}


def _fingerprint(loaded: LoadedTask) -> Any:
    """The task's fingerprint, once per worker process."""
    if loaded.reference not in _FINGERPRINTS:
        _FINGERPRINTS[loaded.reference] = fingerprint_task(loaded.task, loaded.module)
    return _FINGERPRINTS[loaded.reference]


def _reference_data(task: Task, seed: int) -> tuple[Any, Any]:
    if task.load_data is None:
        raise InvalidConfigError(
            f"task {task.name!r} has no reference data set (load_data), so it cannot be "
            "simulated; give it a load_data(seed) -> (train, test), or deploy it"
        )
    return task.load_data(seed)


def _strata(task: Task, dataset: Any) -> Any:
    """What partitioning splits by: the labels, or one stratum for a regression."""
    import numpy as np

    targets = task.targets(dataset)
    return targets if task.is_classification else np.zeros(len(targets), dtype=np.int64)


def _prepare_out_dir(out_dir: Path) -> None:
    """Fail early, before anything is written, if ``out_dir`` cannot hold results."""
    probe_dir = out_dir
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise InvalidConfigError(f"--out {out_dir}: {probe_dir} is a file, not a directory")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise InvalidConfigError(f"--out {out_dir} is not writable: choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise InvalidConfigError(f"--out {out_dir} is not writable ({exc.strerror})") from exc


def _provision_keys(config: JobConfig, out_dir: Path) -> HeContext:
    """Play the key custodian: one HE context; secret to hospitals, public to the coordinator."""
    hospitals = out_dir / "hospitals"
    names = [hospital_name(i) for i in range(config.hospitals)]
    if config.masked:  # each virtual hospital's X25519 key, as a kit's seal.key (kept)
        _in_parallel(lambda name: provision_seal_keys(hospitals, [name]), names)
    public_path = out_dir / PUBLIC_CONTEXT
    if public_path.exists():  # resuming: reuse the consortium's keys
        return HeContext.from_bytes(public_path.read_bytes())
    secret = HeContext.generate()
    first = KeyStore(hospitals / names[0]).put(SIMULATION_KEY_EPOCH, secret)
    where = first.relative_to(hospitals / names[0])
    _in_parallel(lambda name: _link_key(first, hospitals / name / where), names[1:])
    public = secret.public()
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public.serialize_public())
    return public


def _in_parallel(work: Callable[[str], object], names: list[str]) -> None:
    """``work`` for every name on threads: durable writes wait on flushes, which batch.

    One at a time, the keys of 500 hospitals took 22 s, nearly all in fsync.
    """
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(work, names))


def _link_key(source: Path, target: Path) -> None:
    """The consortium's secret context at ``target``, a hard link of ``source`` (0600).

    Every simulated hospital holds the same secret: a link, not 187 kB written
    and flushed per hospital. The folders are flushed as ``KeyStore.put`` does.
    """
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()  # left by an earlier start that did not finish
    os.link(source, target)
    fsync_dir(target.parent)
    fsync_dir(target.parent.parent)


class RichObserver:
    """Per-round progress with accuracy and the highest epsilon so far."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("rounds", total=total, status="starting Flower")
        self.accuracy = "n/a"  # a round is evaluated by the hospitals at the next round

    def on_start(self, job: JobConfig, resumed_after: int) -> None:
        if resumed_after:
            self.console.print(
                f"[yellow]Resuming job {job.job!r} after committed round {resumed_after} "
                f"of {job.rounds}[/yellow]"
            )
        self.progress.update(self.task, completed=resumed_after, status="training")

    def on_round(self, view: RoundView) -> None:
        eps = [p.epsilon for p in view.participations if p.epsilon is not None]
        if view.eval_accuracy is not None:
            self.accuracy = f"{view.eval_accuracy:.3f} (round {view.number})"
        status = f"acc {self.accuracy}  eps max {max(eps, default=0.0):.2f}"
        for p in view.participations:
            if p.status != "ok":
                self.console.print(f"  round {view.number}: {p.hospital} {p.status}: {p.reason}")
        self.progress.update(self.task, completed=view.number, status=status)

    def on_round_failed(self, number: int, attempt: int, reason: str) -> None:
        self.console.print(f"[red]round {number} attempt {attempt} failed:[/red] {reason}")


def _quiet_flower() -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def simulate(
    config: JobConfig,
    *,
    task: Task | None = None,
    out_dir: Path,
    store_url: str | None = None,
    console: Console | None = None,
    gpus_per_hospital: float = 0.0,
    secure_rng: bool = False,
    mlflow_uri: str | None = None,
    ray_address: str | None = None,
) -> JSONObject:
    """Run (or resume) ``config`` on ``config.hospitals`` virtual hospitals.

    ``gpus_per_hospital``: the GPU share Ray reserves for each virtual hospital
    (0.5: two per GPU); with 0 a hospital still uses a GPU it can see.

    ``secure_rng``: DP noise and Poisson batches from the CSPRNG, as deployed;
    off (default): from torch's generator seeded by ``config.seed``: reproducible.

    ``mlflow_uri``: also log the job to MLflow (:mod:`fedvault.coordinator.tracking`),
    with the final model as the simulated hospitals decrypt it.

    ``ray_address``: join this running Ray cluster (``HOST:PORT`` of its head,
    or ``auto``) instead of starting Ray on this machine; every node of the
    cluster must reach ``out_dir`` (one machine, or a shared file system) and
    have fedvault installed. The cluster's CPUs set how many hospitals train
    at once; joining leaves the cluster running.

    Returns the final report (also in ``out_dir/report.json``).
    """
    _check_options(gpus_per_hospital, mlflow_uri)
    loaded = _resolve(config, task)
    task = loaded.task
    if not task.is_classification and config.partition.kind != "iid":
        raise InvalidConfigError(
            f"--partition {config.partition} splits by label, and {task.name!r} is a "
            "regression task: use --partition iid"
        )
    out_dir = Path(out_dir).resolve()
    _prepare_out_dir(out_dir)
    url = store_url or sqlite_url(out_dir / DEFAULT_STORE_FILENAME)
    with RoundStore(url) as store:  # refuses a conflicting job before anything else is written
        existing = store.get_job(config.job)
        if existing is not None:
            store.open_job(config.job, config.to_dict())
    public = _provision_keys(config, out_dir) if config.secure_aggregation.encrypted else None
    settings = CoordinatorSettings(
        job=config,
        store_url=url,
        task=loaded,
        public_context=public,
        report_dir=out_dir,
        consortium="simulation",
    )
    sites = SimulatedSites(
        loaded=loaded,
        partition=config.partition,
        hospitals=config.hospitals,
        seed=config.seed,
        root=out_dir,
        secure_rng=secure_rng,
    )
    observer = RichObserver(console or Console(stderr=True), config.rounds)
    # Follows the store; stopped after the export, so it logs the decrypted final model.
    tracker = start_tracker(
        mlflow_uri, url, config.job, final_weights=lambda: _exported_weights(out_dir)
    )
    try:
        _run_flower(settings, sites, observer, _backend(float(gpus_per_hospital), ray_address))
        report: dict[str, Any] = json.loads((out_dir / REPORT_JSON).read_text())
        if Report.from_json(report).final.rounds_completed:
            _export_final_model(config, out_dir)
    finally:
        if tracker is not None:
            tracker.stop()
    return report  # as written: report.json is the contract (docs/design.md)


def _check_options(gpus_per_hospital: float, mlflow_uri: str | None) -> None:
    """Refuse bad options before anything is written."""
    if not isinstance(gpus_per_hospital, int | float) or not 0 <= gpus_per_hospital <= 64:
        raise InvalidConfigError(
            f"--gpus-per-hospital must be between 0 and 64 (got {gpus_per_hospital!r})"
        )
    if mlflow_uri:
        require_mlflow()  # a missing extra fails now


def _backend(gpus: float, ray_address: str | None) -> dict[str, Any]:
    """Flower's Ray backend: a local Ray on every core, or a running cluster's."""
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if ray_address:
        # Ray refuses resource arguments when joining: the cluster's nodes declared theirs.
        init_args["address"] = ray_address
    else:
        init_args |= {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus}, "init_args": init_args}


def _run_flower(
    settings: CoordinatorSettings,
    sites: SimulatedSites,
    observer: RichObserver,
    backend: dict[str, Any],
) -> None:
    """The production apps on Flower's simulation runtime, one Ray actor per CPU."""
    from flwr.simulation import run_simulation

    from fedvault.app.sim_linkstate import indexed_linkstate

    _quiet_flower()
    with observer.progress, indexed_linkstate():
        run_simulation(
            server_app=make_server_app(lambda _ctx: settings, observer),
            client_app=make_client_app(sites),
            num_supernodes=settings.job.hospitals,
            backend_config=backend,
        )


def _exported_weights(out_dir: Path) -> dict[str, Any] | None:
    """The final model ``OUT/model/`` holds (decrypted), or ``None`` before any round."""
    from fedvault.app.model_export import load_export

    target = out_dir / "model"
    return load_export(target)[0] if target.is_dir() else None


def noise_source(secure_rng: bool) -> str:
    """How a summary names where the hospitals' DP noise and Poisson batches came from."""
    if secure_rng:
        return "ChaCha20 (CSPRNG, as deployed)"
    return "torch's seeded generator (fast, reproducible; not for deployment)"


def _resolve(config: JobConfig, task: Task | None) -> LoadedTask:
    """The job's task: the object given (a researcher's own), or the one it names."""
    if task is None:
        return load_task(config.task)
    if task.name != config.task and not _names(config.task, task):
        raise InvalidConfigError(
            f"job is for task {config.task!r} but task {task.name!r} was given"
        )
    return LoadedTask(reference=config.task, module=_module_of(task), task=task)


def _names(reference: str, task: Task) -> bool:
    """Whether ``reference`` resolves to ``task`` itself."""
    try:
        return load_task(reference).task is task
    except InvalidConfigError:
        return False


def _module_of(task: Task) -> str:
    """The module a task object was defined in (its model factory's)."""
    import sys

    module = str(getattr(task.build_model, "__module__", "") or "__main__")
    if module == "__main__":  # `python -m pkg.mod`: the module's import name is in its spec
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", None) or module
    return module


def _export_final_model(config: JobConfig, out_dir: Path) -> None:
    """``OUT/model/``: the final global model as hospital-1 decrypts it, with its card."""
    import shutil

    from fedvault.app.model_export import export_from_hospital

    target = out_dir / "model"
    if target.exists():
        shutil.rmtree(target)  # a resumed run replaces the previous export
    export_from_hospital(
        state_dir=out_dir / "hospitals" / hospital_name(0),
        job=config.job,
        selector="latest",
        out=target,
    )


def run_cli(
    task: Task, argv: Sequence[str] | None = None, *, hospitals: int, rounds: int
) -> JSONObject:
    """Run ``task`` as a simulated consortium from the command line.

    Returns
    -------
    dict
        The simulation report (also written to ``OUT/report.json``).
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m fedvault.examples.{task.name.replace('-', '_')}",
        description=f"Simulate a consortium training {task.description or task.name}.",
    )
    parser.add_argument("--hospitals", type=int, default=hospitals)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA")
    parser.add_argument("--secure-aggregation", choices=("he", "none"), default="he")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-masking",
        action="store_true",
        help="he mode without SecAgg+ masking inside the encryption (for comparison)",
    )
    parser.add_argument(
        "--secure-rng",
        action="store_true",
        help="DP noise and sampling from a CSPRNG, as deployed (default: seeded, reproducible)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs") / task.name)
    args = parser.parse_args(argv)
    config = JobConfig.for_task(
        task,
        hospitals=args.hospitals,
        rounds=args.rounds,
        epsilon=args.epsilon,
        delta=args.delta,
        partition=args.partition,
        secure_aggregation=args.secure_aggregation,
        seed=args.seed,
        masking=not args.no_masking,
    )
    report: dict[str, Any] = simulate(
        config, task=task, out_dir=args.out, secure_rng=args.secure_rng
    )
    final = report["final"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(final.get("metrics", {}).items()))
    print(
        f"{task.name}: {shown} at epsilon {final['epsilon_max']:.2f} "
        f"(delta {final['delta']:g}); DP noise from {noise_source(args.secure_rng)}; "
        f"report and model in {args.out}"
    )
    return report
