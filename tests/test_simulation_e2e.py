"""One end-to-end simulation through Flower's runtime with the production apps.

Few rounds on purpose: Ray start-up alone costs ~10 s. Checks the report
contract, the privacy accounting against an independent re-derivation, and
that nothing the coordinator stored holds a HE secret key.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tenseal as ts

from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.privacy.dp import compute_epsilon

pytestmark = pytest.mark.e2e

HOSPITALS, ROUNDS, EPSILON = 3, 2, 3.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim")
    cmd = [
        sys.executable,
        "-m",
        "fedvault",
        "simulate",
        "--example",
        "breast-cancer",
        "--hospitals",
        str(HOSPITALS),
        "--rounds",
        str(ROUNDS),
        "--epsilon",
        str(EPSILON),
        "--secure-aggregation",
        "he",
        "--seed",
        "1",
        "--out",
        str(out),
    ]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_report_contract(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    assert report["config"]["secure_aggregation"] == "he"
    names = {f"hospital-{i}" for i in range(1, HOSPITALS + 1)}
    assert set(report["hospitals"]) == names
    for r in report["rounds"]:
        assert set(r["epsilon"]) == names
        assert 0.0 <= r["accuracy"] <= 1.0
    # A logistic regression on standardized breast-cancer data is already good after 2 DP rounds.
    assert report["final"]["accuracy"] >= 0.85
    assert report["final"]["status"] == "finished"
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert "final accuracy" in (run_dir / "stdout.txt").read_text()
    final = report["final"]["metrics"]
    assert final["accuracy"] == report["final"]["accuracy"]
    assert {"auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"} <= set(final)
    assert set(report["final"]["hospital_metrics"]) == names


def test_simulate_exports_the_final_model_and_it_reproduces_the_pooled_metrics(
    run_dir: Path,
) -> None:
    from safetensors.torch import load_file

    from fedvault.client.training import evaluate
    from fedvault.examples.breast_cancer import TASK

    report = json.loads((run_dir / "report.json").read_text())
    card = json.loads((run_dir / "model" / "model-card.json").read_text())
    assert json.dumps(card).count("hospital-1") >= 1
    model = TASK.build_model()
    model.load_state_dict(load_file(str(run_dir / "model" / "model.safetensors")))
    assert TASK.load_data is not None
    _, test = TASK.load_data(1)  # --seed 1; the hospitals' test parts are all of it
    again = evaluate(model, test, task=TASK, device=__import__("torch").device("cpu"))
    pooled = report["final"]["metrics"]
    for name in ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "loss"):
        assert again.metrics[name] == pytest.approx(pooled[name], abs=1e-6), name
    # Pooled AUROC comes from 1,000-bin histograms: the exact one is within a bin.
    assert again.metrics["auroc"] == pytest.approx(pooled["auroc"], abs=2e-3)


@pytest.mark.parametrize(
    ("task", "rounds", "expected"),
    [
        ("diabetes", 2, {"mae", "rmse", "r2", "loss"}),
        ("imaging", 1, {"accuracy", "balanced_accuracy", "auroc_macro", "f1_macro", "loss"}),
    ],
)
def test_regression_and_imaging_tasks_simulate_with_their_metrics(
    task: str, rounds: int, expected: set[str], tmp_path: Path
) -> None:
    cmd = [
        sys.executable, "-m", "fedvault", "simulate", "--example", task,
        "--hospitals", "2", "--rounds", str(rounds), "--out", str(tmp_path),
        "--secure-rng",  # noise and batches from the CSPRNG, as deployed hospitals draw them
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "DP noise and sampling: ChaCha20" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final"]["status"] == "finished"
    assert set(report["final"]["metrics"]) == expected
    assert all(
        set(m) >= expected - {"auroc_macro"} for m in report["final"]["hospital_metrics"].values()
    )
    if task == "diabetes":
        assert report["final"]["accuracy"] is None  # no accuracy for a regression
    assert (tmp_path / "model" / "model.safetensors").stat().st_size > 0


def test_epsilon_rederived_from_reported_dp_parameters(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    delta = report["final"]["delta"]
    for name, h in report["hospitals"].items():
        assert h["accountant"] == "prv"
        independent = compute_epsilon(
            noise_multiplier=h["noise_multiplier"],
            sample_rate=h["sample_rate"],
            steps=h["steps"],
            delta=delta,
            accountant="prv",
        )
        assert h["epsilon"] == pytest.approx(independent, rel=1e-6), name
        # Two of the ten planned rounds spend well under the job's budget.
        assert 0 < h["epsilon"] < EPSILON
    epsilons = [r["epsilon"]["hospital-1"] for r in report["rounds"]]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]  # accumulates


def test_coordinator_store_holds_no_secret_key(run_dir: Path) -> None:
    secret_bytes = (
        run_dir / "hospitals" / "hospital-1" / "keys" / "epoch-0" / "he-secret.ctx"
    ).read_bytes()
    assert ts.context_from(secret_bytes).is_private()
    store = RoundStore(sqlite_url(run_dir / "fedvault.sqlite"))
    blobs = list(store.iter_blobs())
    store.close()
    assert any(name.startswith("models.") for name, _ in blobs)
    for name, blob in blobs:
        data = blob if isinstance(blob, bytes) else str(blob).encode()
        assert secret_bytes not in data, name
        try:
            ctx = ts.context_from(data)
        except Exception:
            continue
        assert not ctx.is_private(), f"{name} holds a secret HE context"
    public = ts.context_from((run_dir / "coordinator" / "he-public.ctx").read_bytes())
    assert not public.is_private()


def test_rounds_record_when_they_really_started(run_dir: Path) -> None:
    with RoundStore(sqlite_url(run_dir / "fedvault.sqlite")) as store:
        (job,) = store.list_jobs()
        rounds = [r for r in store.rounds(job.id) if r.status == "committed"]
    assert [r.number for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:  # a round takes training time: it did not start when it committed
        assert r.started_at is not None and r.committed_at is not None
        assert r.started_at < r.committed_at, r
    for before, after in itertools.pairwise(rounds):
        assert before.committed_at is not None and after.started_at is not None
        assert after.started_at >= before.committed_at  # rounds run one after another
