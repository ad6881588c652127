"""One end-to-end simulation through Flower's runtime with the production apps.

Few rounds on purpose: Ray start-up alone costs ~10 s. Checks the report
contract, the privacy accounting against an independent re-derivation, and
that nothing the coordinator stored holds a HE secret key.
"""

from __future__ import annotations

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
