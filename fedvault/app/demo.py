"""``fedvault demo``: a whole consortium as real processes on 127.0.0.1.

Provisions a 3-hospital consortium (CA, kits), lays out each hospital's share of
the breast-cancer data as CSV with a declared schema, starts the coordinator
daemon and three hospital daemons as separate processes, follows the job from
the round store, prints the summary, and shuts every process down — also on
Ctrl-C, leaving no SuperLink or SuperNode behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.errors import FedvaultError, InvalidConfigError
from fedvault.flower_env import free_port, spawn, terminate_tree
from fedvault.json_types import JSONObject

if TYPE_CHECKING:
    import numpy as np

__all__ = ["prepare_consortium", "provision_loopback", "run_demo", "write_hospital_data"]

JOB_NAME = "demo-breast-cancer"


def provision_loopback(
    work: Path, consortium: str, names: Sequence[str], operators: Mapping[str, str]
) -> Path:
    """Provision ``names`` and ``operators`` as a consortium on free 127.0.0.1 ports.

    The first of ``names`` is the key custodian; ``operators`` maps name -> role;
    the kits go to ``work/kits``.
    """
    from fedvault.app.provision import provision

    toml = work / "consortium.toml"
    toml.write_text(
        "[consortium]\n"
        f'name = "{consortium}"\n'
        f'coordinator = "127.0.0.1:{free_port()}"\n'
        f'operator_api = "127.0.0.1:{free_port()}"\n'
        f'custodian = "{names[0]}"\n'
        + "".join(f'\n[[hospitals]]\nname = "{n}"\n' for n in names)
        + "".join(f'\n[[operators]]\nname = "{n}"\nrole = "{r}"\n' for n, r in operators.items())
    )
    provision(toml, work / "kits")
    return work / "kits"


def write_hospital_data(
    directory: Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    min_records: int = 20,
    task: str = "breast-cancer",
    epsilon: float = 3.0,
) -> Path:
    """One hospital's breast-cancer share as CSV files plus their data spec; the spec's path.

    Beside them, ``policy.toml``: the hospital's site policy, allowing ``task`` at
    up to ``epsilon`` per job (a hospital trains nothing its policy does not allow).
    """
    from fedvault.client.data import write_csv_partition, write_spec
    from fedvault.client.policy import write_policy

    write_policy(
        directory / "policy.toml",
        tasks=[task],
        max_epsilon_per_job=epsilon,
        max_delta=1e-5,
        min_records=min_records,
    )

    features = [f"f{i}" for i in range(train[0].shape[1])]
    write_csv_partition(directory / "train.csv", *train, feature_names=features)
    write_csv_partition(directory / "test.csv", *test, feature_names=features)
    return write_spec(
        directory / "data.toml",
        format="csv",
        train="train.csv",
        test="test.csv",
        label="label",
        features=features,
        labels=[0, 1],
        min_records=min_records,
    )


def prepare_consortium(
    work: Path,
    *,
    hospitals: int,
    rounds: int,
    epsilon: float,
    seed: int = 0,
    masking: bool = True,
) -> dict[str, Path]:
    """Kits, per-hospital data and the job file under ``work``; returns their paths.

    Each hospital's data comes with its site policy, ``data/NAME/policy.toml``.
    ``masking=False`` writes ``masking = false`` into the job (to measure its cost).
    """
    from fedvault.partition import Partition, partition_indices
    from fedvault.task_registry import load_task

    # By its entry point, like every task a consortium runs: examples sit above the apps.
    load_data = load_task("breast-cancer").task.load_data
    assert load_data is not None  # the built-in task ships reference data

    names = [f"hospital-{i + 1}" for i in range(hospitals)]
    # One operator per role, so the operator API and the dashboard can be tried with each.
    roles = ("admin", "engineer", "auditor", "guest")
    operators = dict(zip(("operator", "engineer", "auditor", "visitor"), roles, strict=True))
    provision_loopback(work, "demo-consortium", names, operators)
    train, test = load_data(seed)
    x_train, y_train = (t.numpy() for t in train.tensors)  # type: ignore[attr-defined]
    x_test, y_test = (t.numpy() for t in test.tensors)  # type: ignore[attr-defined]
    iid = Partition(kind="iid")
    train_parts = partition_indices(y_train, hospitals, iid, seed=seed)
    test_parts = partition_indices(y_test, hospitals, iid, seed=seed, min_size=1)
    for name, tr, te in zip(names, train_parts, test_parts, strict=True):
        write_hospital_data(
            work / "data" / name,
            (x_train[tr], y_train[tr]),
            (x_test[te], y_test[te]),
            epsilon=epsilon,
        )
    job = work / "job.toml"
    job.write_text(
        f'[job]\nname = "{JOB_NAME}"\ntask = "breast-cancer"\nhospitals = {hospitals}\n'
        f"rounds = {rounds}\nepsilon = {epsilon}\nseed = {seed}\n"
        + ("" if masking else "masking = false\n")
    )
    return {"kits": work / "kits", "data": work / "data", "job": job, "state": work / "coordinator"}


def _follow(
    store_url: str,
    rounds: int,
    procs: dict[str, subprocess.Popen[bytes]],
    console: Console,
    logs: Path,
) -> str:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task(
        "rounds", total=rounds, status="starting SuperLink, SuperNodes, key ceremony"
    )
    deadline = time.monotonic() + 120 + 120 * rounds  # generous: 2 shared cores
    with progress:
        while True:
            exited = [name for name, proc in procs.items() if proc.poll() is not None]
            if time.monotonic() > deadline:
                raise FedvaultError(f"the job did not finish in time; see the logs in {logs}")
            try:
                with RoundStore(store_url) as store:
                    job = store.get_job(JOB_NAME)
                    views = (
                        [v for v in store.rounds(job.id) if v.status == "committed"] if job else []
                    )
            except FedvaultError:
                job, views = None, []
            if views:
                last = views[-1]
                scored = [v for v in views if v.eval_accuracy is not None]
                acc = f"{scored[-1].eval_accuracy:.3f}" if scored else "n/a"
                eps = max((p.epsilon or 0.0 for p in last.participations), default=0.0)
                progress.update(task, completed=last.number, status=f"acc {acc}  eps max {eps:.2f}")
            if job is not None and job.status in ("finished", "failed", "stopped"):
                return job.status
            if exited:  # a daemon died while the job still runs
                name = exited[0]
                tail = (logs / f"{name}.log").read_text()[-3000:]
                raise FedvaultError(f"{name} exited early (code {procs[name].returncode}):\n{tail}")
            time.sleep(2.0)


def _wait_for_enrolment(
    store_url: str, hospitals: int, coordinator: subprocess.Popen[bytes], logs: Path
) -> None:
    """Start hospitals once their node keys are registered (else Flower refuses them once)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if coordinator.poll() is not None:
            tail = (logs / "coordinator.log").read_text()[-3000:]
            raise FedvaultError(
                f"the coordinator exited early (code {coordinator.returncode}):\n{tail}"
            )
        try:
            with RoundStore(store_url) as store:
                enrolled = sum(e.kind == "node_enrolled" for e in store.audit_events())
        except FedvaultError:
            enrolled = 0
        if enrolled >= hospitals:
            return
        time.sleep(1.0)
    raise FedvaultError(
        "the coordinator did not enrol the hospitals within 120 s; see logs/coordinator.log"
    )


def _metrics_port(console: Console, daemon: str) -> list[str]:
    """``--metrics-port`` on a free port for ``daemon``, announced on the console."""
    port = free_port()
    console.print(f"metrics: {daemon} http://127.0.0.1:{port}/metrics", highlight=False)
    return ["--metrics-port", str(port)]


def _dashboard_port(console: Console, kits: Path) -> list[str]:
    """``--dashboard-port`` on a free port, announced with the certificate that opens it."""
    port = free_port()
    admin = kits / "operators" / "operator"
    console.print(f"dashboard: https://127.0.0.1:{port}/", highlight=False)
    console.print(
        f"  open it with the admin's certificate {admin / 'operator.pem'} and key operator.key, "
        f"trusting {admin / 'ca.pem'} (mutual TLS); the engineer, auditor and visitor kits "
        "beside it show what their roles see",
        highlight=False,
    )
    return ["--dashboard-port", str(port)]


def run_demo(
    out_dir: Path | None,
    console: Console,
    *,
    hospitals: int = 3,
    rounds: int = 10,
    epsilon: float = 3.0,
    masking: bool = True,
) -> JSONObject:
    """Run the demo consortium as real processes in ``out_dir``; returns its report."""
    work = Path(out_dir).resolve() if out_dir else Path(tempfile.mkdtemp(prefix="fedvault-demo-"))
    if work.exists() and any(work.iterdir()):
        raise InvalidConfigError(f"--out {work} is not empty; choose a new directory")
    work.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]fedvault demo[/bold]: {hospitals} hospitals on 127.0.0.1, working in {work}"
    )
    paths = prepare_consortium(
        work, hospitals=hospitals, rounds=rounds, epsilon=epsilon, masking=masking
    )
    logs = work / "logs"
    logs.mkdir()
    py = [sys.executable, "-m", "fedvault"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["coordinator"] = spawn(
            [
                *py,
                "coordinator",
                "start",
                "--kit",
                str(paths["kits"] / "coordinator"),
                "--job",
                str(paths["job"]),
                "--state",
                str(paths["state"]),
                *_metrics_port(console, "coordinator"),
                *_dashboard_port(console, paths["kits"]),
            ],
            env=dict(os.environ),
            log_path=logs / "coordinator.log",
        )
        store_url = sqlite_url(paths["state"] / DEFAULT_STORE_FILENAME)
        _wait_for_enrolment(store_url, hospitals, procs["coordinator"], logs)
        for i in range(hospitals):
            name = f"hospital-{i + 1}"
            procs[name] = spawn(
                [
                    *py,
                    "client",
                    "start",
                    "--kit",
                    str(paths["kits"] / "hospitals" / name),
                    "--data",
                    str(paths["data"] / name / "data.toml"),
                    "--policy",
                    str(paths["data"] / name / "policy.toml"),
                    "--state",
                    str(work / "hospital-state" / name),
                    *_metrics_port(console, name),
                ],
                env=dict(os.environ),
                log_path=logs / f"{name}.log",
            )
        status = _follow(store_url, rounds, procs, console, logs)
        report: dict[str, Any] = json.loads((paths["state"] / "report.json").read_text())
        for name in ("report.json", "report.png"):
            shutil.copy2(paths["state"] / name, work / name)
        report["final"]["status"] = status
        report["out_dir"] = str(work)
        return report
    finally:
        for proc in reversed(list(procs.values())):
            terminate_tree(proc, grace=15.0)
        console.print(f"all {len(procs)} daemons stopped; logs in {logs}")
