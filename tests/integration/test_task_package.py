"""A consortium's own task, deployed: a separately installed package, consent and export.

One real deployment on 127.0.0.1 (provisioned kits, the coordinator daemon and
three hospital daemons, TLS, BFV encryption) runs the job ``task =
"oncology-mlp"`` from ``examples/task-package``, a distribution of its own that
the test installs (``pip install --target``) outside fedvault's folders, and
hands to each party through ``PYTHONPATH`` as that party's own environment:

* hospital-1 allows the task in its site policy and trains it (quorum 1);
* hospital-2's policy allows only ``breast-cancer``: it refuses every round
  before training, and the reason reaches the coordinator's participations,
  its audit log and ``fedvault status``;
* hospital-3 allows the task but has version 0.2.0 installed (one changed
  line): its task fingerprint differs from the coordinator's, so it refuses
  before round 1's training, naming both versions, and never spends ε;
* hospital-1 exports the final model; the safetensors file loads into the
  task's own model in plain PyTorch and reproduces, on hospital-1's test data,
  the final metrics hospital-1 reported (to 1e-6).

Bad input on the way is one line and exit code 2: a site policy that does not
parse, export of a round that does not exist, export without the HE key, and
a coordinator-side export of an encrypted job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fedvault.app.demo import provision_loopback, write_hospital_data
from fedvault.client.data import DataSpec, load_task_data
from fedvault.client.ledger import LocalLedger
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.flower_env import spawn, terminate_tree
from fedvault.partition import Partition, partition_indices

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "examples" / "task-package"
NAMES = ("hospital-1", "hospital-2", "hospital-3")
JOB = "oncology-2026"
TASK = "oncology-mlp"
ROUNDS = 2
SCENARIO_TIMEOUT_S = 480


def _install(source: Path, target: Path) -> None:
    """``pip install --target``: the task's distribution, beside (not inside) fedvault."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


def _fedvault(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**env, "COLUMNS": "250"},
    )


@dataclass
class Deployment:
    root: Path
    store_url: str
    kits: Path
    data: Path
    state: dict[str, Path]
    v1: Path
    env: dict[str, str]
    status: str
    logs: dict[str, str]
    status_output: str  # `fedvault status` while the job ran (the daemon exits after it)

    def explain(self) -> str:
        return "\n".join(f"--- {n} ---\n{t[-3000:]}" for n, t in self.logs.items())


def _committed(url: str) -> int:
    try:
        with RoundStore(url) as store:
            job = store.get_job(JOB)
            return 0 if job is None else store.last_committed_round(job.id)
    except Exception:
        return 0


def _job_status(url: str) -> str | None:
    try:
        with RoundStore(url) as store:
            job = store.get_job(JOB)
            return None if job is None else job.status
    except Exception:  # the store may be locked or mid-migration at start-up
        return None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("task-package")
    v1, v2 = root / "site-v1", root / "site-v2"
    _install(PACKAGE, v1)
    changed = root / "task-package-0.2.0"
    shutil.copytree(PACKAGE, changed, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pyproject = changed / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.2.0"'))
    module = changed / "oncology_task" / "__init__.py"
    module.write_text(module.read_text() + "\n# 0.2.0: a local change at one site\n")
    _install(changed, v2)

    kits = provision_loopback(root, "oncology-consortium", NAMES, {"operator": "admin"})
    from fedvault.examples.breast_cancer import load_data

    train, test = load_data(0)
    x_train, y_train = (t.numpy() for t in train.tensors)  # type: ignore[attr-defined]
    x_test, y_test = (t.numpy() for t in test.tensors)  # type: ignore[attr-defined]
    iid = Partition(kind="iid")
    train_parts = partition_indices(y_train, len(NAMES), iid, seed=0)
    test_parts = partition_indices(y_test, len(NAMES), iid, seed=0, min_size=1)
    allowed = {"hospital-1": TASK, "hospital-2": "breast-cancer", "hospital-3": TASK}
    for name, tr, te in zip(NAMES, train_parts, test_parts, strict=True):
        write_hospital_data(
            root / "data" / name,
            (x_train[tr], y_train[tr]),
            (x_test[te], y_test[te]),
            task=allowed[name],
        )
    job = root / "job.toml"
    job.write_text(
        f'[job]\nname = "{JOB}"\ntask = "{TASK}"\nhospitals = 3\nrounds = {ROUNDS}\n'
        "epsilon = 3.0\nmin_hospitals = 1\nround_timeout_s = 60\n"
        # Two of three hospitals refuse: unmasked, since a masked round of three
        # tolerates no dropout (docs/secagg.md).
        "masking = false\n"
    )

    def env_with(site: Path) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path}

    coordinator_state = root / "coordinator"
    store_url = sqlite_url(coordinator_state / DEFAULT_STORE_FILENAME)
    state = {name: root / "hospital-state" / name for name in NAMES}
    logs = root / "logs"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    status = "timeout"
    try:
        procs["coordinator"] = spawn(
            [sys.executable, "-m", "fedvault", "coordinator", "start",
             "--kit", str(kits / "coordinator"), "--job", str(job),
             "--state", str(coordinator_state), "--exit-when-idle"],
            env=env_with(v1), log_path=logs / "coordinator.log",
        )  # fmt: skip
        from fedvault.app.demo import _wait_for_enrolment

        _wait_for_enrolment(store_url, len(NAMES), procs["coordinator"], logs)
        for name in NAMES:
            procs[name] = spawn(
                [sys.executable, "-m", "fedvault", "client", "start",
                 "--kit", str(kits / "hospitals" / name),
                 "--data", str(root / "data" / name / "data.toml"),
                 "--policy", str(root / "data" / name / "policy.toml"),
                 "--state", str(state[name])],
                env=env_with(v2 if name == "hospital-3" else v1),
                log_path=logs / f"{name}.log",
            )  # fmt: skip
        deadline = time.monotonic() + SCENARIO_TIMEOUT_S
        status_output = ""
        while time.monotonic() < deadline:
            if not status_output and _committed(store_url) >= 1:
                seen = _fedvault(
                    "status", "--kit", str(kits / "operators" / "operator"), "--job", JOB,
                    env=env_with(v1),
                )  # fmt: skip
                status_output = f"exit {seen.returncode}\n{seen.stdout}\n{seen.stderr}"
            now = _job_status(store_url)
            if now in ("finished", "failed", "stopped"):
                status = now
                break
            if procs["coordinator"].poll() is not None:
                status = f"coordinator exited {procs['coordinator'].returncode}"
                break
            time.sleep(2.0)
        # The coordinator hands hospitals the final summary, then exits by itself.
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs["coordinator"].wait(timeout=90)
        deployed = Deployment(
            root=root,
            store_url=store_url,
            kits=kits,
            data=root / "data",
            state=state,
            v1=v1,
            env=env_with(v1),
            status=status,
            logs={},
            status_output=status_output,
        )
        yield deployed
    finally:
        for proc in procs.values():
            terminate_tree(proc, grace=10.0)  # type: ignore[arg-type]
        if logs.is_dir():
            for log in logs.iterdir():
                print(f"--- {log.name} ---\n{log.read_text()[-2000:]}")


def _logs(d: Deployment) -> str:
    return "\n".join(
        f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted((d.root / "logs").iterdir())
    )


def test_the_task_package_trains_in_he_mode_with_consent(deployment: Deployment) -> None:
    d = deployment
    assert d.status == "finished", _logs(d)
    with RoundStore(d.store_url) as store:
        job = store.get_job(JOB)
        assert job is not None and job.config["task"] == TASK
        assert job.config["secure_aggregation"] == "he"
        rounds = [r for r in store.rounds(job.id) if r.status == "committed"]
        audit = store.audit_events(job.id)
    assert [r.number for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        by = {p.hospital: p for p in r.participations}
        assert by["hospital-1"].status == "ok", by
        # hospital-2: its own site policy does not allow the task.
        assert by["hospital-2"].status == "refused"
        assert by["hospital-2"].reason.startswith("PolicyRefusalError: ")
        assert f"does not allow task '{TASK}'" in by["hospital-2"].reason
        # hospital-3: another version of the task, refused before training.
        assert by["hospital-3"].status == "refused"
        assert by["hospital-3"].reason.startswith("TaskMismatchError: ")
        assert "0.1.0" in by["hospital-3"].reason and "0.2.0" in by["hospital-3"].reason
    refusals = {(e.actor, e.detail["round"]) for e in audit if e.kind == "round_refused"}
    assert {("hospital-2", n) for n in range(1, ROUNDS + 1)} <= refusals
    assert {("hospital-3", n) for n in range(1, ROUNDS + 1)} <= refusals
    started = [e for e in audit if e.kind == "job_started"]
    assert started and started[0].detail["task_version"] == "0.1.0"
    assert started[0].detail["task_fingerprint"].startswith("sha256:")
    # Neither refusing hospital trained: no privacy spent, nothing booked.
    for name in ("hospital-2", "hospital-3"):
        with LocalLedger(d.state[name] / "ledger.sqlite", hospital=name) as ledger:
            assert ledger.entries(JOB) == []
    with LocalLedger(d.state["hospital-1"] / "ledger.sqlite", hospital="hospital-1") as ledger:
        assert len(ledger.entries(JOB)) == ROUNDS


def test_refusals_are_visible_in_fedvault_status(deployment: Deployment) -> None:
    seen = deployment.status_output
    assert seen.startswith("exit 0"), seen
    assert "PolicyRefusalError" in seen and "does not allow task" in seen, seen
    assert "TaskMismatchError" in seen and "0.2.0" in seen, seen
    assert "final auroc" in seen or "round" in seen, seen


def test_a_hospital_exports_the_model_and_it_reproduces_its_metrics(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = deployment
    out = d.root / "export"
    done = _fedvault(
        "model", "export", "--kit", str(d.kits / "hospitals" / "hospital-1"),
        "--state", str(d.state["hospital-1"]), "--job", JOB, "--out", str(out), env=d.env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    card = json.loads((out / "model-card.json").read_text())
    assert "ε" in (out / "MODEL_CARD.md").read_text()

    # The task's own model, in plain PyTorch, from the task package as installed.
    monkeypatch.syspath_prepend(str(d.v1))
    from safetensors.torch import load_file

    from fedvault.task_registry import load_task

    task = load_task(TASK).task
    model = task.build_model()
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    model.eval()
    data = load_task_data(task, DataSpec.load(d.data / "hospital-1" / "data.toml"))
    features, labels = data.test.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        probs = model(features).softmax(dim=1)[:, 1].numpy()
    from sklearn.metrics import accuracy_score, roc_auc_score

    report = json.loads((d.root / "coordinator" / "report.json").read_text())
    reported = report["final"]["hospital_metrics"]["hospital-1"]
    assert card["round"] == ROUNDS
    assert accuracy_score(labels.numpy(), (probs >= 0.5).astype(np.int64)) == pytest.approx(
        reported["accuracy"], abs=1e-6
    )
    assert roc_auc_score(labels.numpy(), probs) == pytest.approx(reported["auroc"], abs=1e-6)
    # ... and every other metric, through the same evaluation the hospital ran.
    from fedvault.client.training import evaluate

    again = evaluate(model, data.test, task=task, device=torch.device("cpu"))
    for name, value in reported.items():
        assert again.metrics[name] == pytest.approx(value, abs=1e-6), name


def test_model_versions_are_listed_and_best_follows_the_jobs_metric(
    deployment: Deployment,
) -> None:
    d = deployment
    hospital = ("--kit", str(d.kits / "hospitals" / "hospital-1"))
    listed = _fedvault("model", "list", *hospital, "--state", str(d.state["hospital-1"]), env=d.env)
    assert listed.returncode == 0, listed.stderr
    assert JOB in listed.stdout and "auroc" in listed.stdout, listed.stdout
    best = _fedvault(
        "model", "export", *hospital, "--state", str(d.state["hospital-1"]), "--job", JOB,
        "--round", "best", "--out", str(d.root / "best"), env=d.env,
    )  # fmt: skip
    assert best.returncode == 0, best.stderr
    report = json.loads((d.root / "coordinator" / "report.json").read_text())
    assert report["config"]["best_metric"] == "auroc"  # the binary task's default
    by_round = {r["round"]: r["metrics"]["auroc"] for r in report["rounds"]}
    top = max(by_round.values())
    card = json.loads((d.root / "best" / "model-card.json").read_text())
    assert by_round[card["round"]] == top, (card["round"], by_round)


def test_export_errors_are_one_line_with_exit_code_2(deployment: Deployment) -> None:
    d = deployment
    hospital = ("--kit", str(d.kits / "hospitals" / "hospital-1"))
    missing = _fedvault(
        "model", "export", *hospital, "--state", str(d.state["hospital-1"]), "--job", JOB,
        "--round", "99", "--out", str(d.root / "x1"), env=d.env,
    )  # fmt: skip
    assert missing.returncode == 2 and "99" in missing.stderr, missing.stderr
    # The same state directory without the HE key: nothing can be decrypted.
    keyless = d.root / "keyless"
    shutil.copytree(d.state["hospital-1"], keyless, ignore=shutil.ignore_patterns("keys"))
    no_key = _fedvault(
        "model", "export", *hospital, "--state", str(keyless), "--job", JOB,
        "--out", str(d.root / "x2"), env=d.env,
    )  # fmt: skip
    assert no_key.returncode == 2 and "key" in no_key.stderr.lower(), no_key.stderr
    coordinator = _fedvault(
        "model", "export", "--store", d.store_url, "--kit", str(d.kits / "coordinator"),
        "--job", JOB, "--out", str(d.root / "x3"), env=d.env,
    )  # fmt: skip
    assert coordinator.returncode == 2 and "he mode" in coordinator.stderr, coordinator.stderr
    for done in (missing, no_key, coordinator):
        assert done.stderr.strip().startswith("error:") and done.stdout == ""


def test_a_policy_that_does_not_parse_stops_the_hospital(deployment: Deployment) -> None:
    d = deployment
    bad = d.root / "bad-policy.toml"
    bad.write_text("[[tasks]\nname = ")
    done = _fedvault(
        "client", "start", "--kit", str(d.kits / "hospitals" / "hospital-1"),
        "--data", str(d.data / "hospital-1" / "data.toml"), "--policy", str(bad),
        "--state", str(d.root / "bad-state"), env=d.env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "bad-policy.toml" in done.stderr
