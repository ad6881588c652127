"""report.json / report.png built from the round store."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedvault import durable
from fedvault.coordinator.records import HospitalEval, Participation
from fedvault.coordinator.report import build_report, write_report
from fedvault.coordinator.store import RoundStore
from fedvault.errors import StoreError

if TYPE_CHECKING:  # fixtures' types; conftest is not importable under --import-mode=importlib
    from conftest import Rounds

CONFIG = {"example": "breast-cancer", "rounds": 3, "epsilon": 2.0, "delta": 1e-5}
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
# Weighted over samples 100/200/300: sum(i * 100 * i) / 600 = 1400 / 600.
MEAN_INDEX = 1400 / 600


def _evaluations(number: int) -> list[HospitalEval]:
    return [
        HospitalEval(
            hospital=h,
            accuracy=0.5 + 0.1 * number + 0.01 * i,
            loss=1.0 / number + 0.1 * i,
            samples=100 * i,
        )
        for i, h in enumerate(HOSPITALS, start=1)
    ]


@pytest.fixture
def store(data: Rounds) -> Iterator[RoundStore]:
    """Three committed rounds: hospital-3 refuses round 2, hospital-2 is rejected in round 3,
    and round 2 first fails once."""
    with RoundStore("sqlite://") as s:
        job = s.open_job("bc", CONFIG)
        s.commit_round(job.id, data.commit(1, HOSPITALS))
        s.record_failed_round(
            job.id,
            2,
            reason="too few replies",
            participations=[
                Participation(hospital="hospital-1", status="failed", reason="timeout")
            ],
        )
        s.commit_round(job.id, data.commit(2, HOSPITALS[:2], refused=["hospital-3"]))
        s.commit_round(
            job.id, data.commit(3, ["hospital-1", "hospital-3"], rejected=["hospital-2"])
        )
        for number in (1, 2, 3):
            s.record_evaluation(job.id, number, evaluations=_evaluations(number))
        s.set_job_status(job.id, "finished")
        yield s


def test_build_report_follows_the_schema(store: RoundStore, data: Rounds) -> None:
    report = build_report(store, "bc").to_json()
    assert set(report) == {"config", "rounds", "final", "hospitals"}
    assert report["config"] == CONFIG
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]  # committed only, each once
    for r in rounds:
        n = r["round"]
        assert r["accuracy"] == pytest.approx(0.5 + 0.1 * n + 0.01 * MEAN_INDEX, rel=1e-12)
        assert r["loss"] == pytest.approx(1.0 / n + 0.1 * MEAN_INDEX, rel=1e-12)

    eps = data.epsilon
    expected_epsilon = [
        {h: eps(h, 1) for h in HOSPITALS},
        # hospital-3 refused round 2: its round-1 ε carries forward.
        {
            "hospital-1": eps("hospital-1", 2),
            "hospital-2": eps("hospital-2", 2),
            "hospital-3": eps("hospital-3", 1),
        },
        {
            "hospital-1": eps("hospital-1", 3),
            "hospital-2": eps("hospital-2", 2),
            "hospital-3": eps("hospital-3", 3),
        },
    ]
    for r, want in zip(rounds, expected_epsilon, strict=True):
        assert r["epsilon"] == pytest.approx(want, rel=1e-12)
    assert [r["participants"] for r in rounds] == [
        list(HOSPITALS),
        ["hospital-1", "hospital-2"],
        ["hospital-1", "hospital-3"],
    ]
    assert [r["refused"] for r in rounds] == [{}, {"hospital-3": "budget exhausted"}, {}]
    assert [r["rejected"] for r in rounds] == [
        {},
        {},
        {"hospital-2": "context fingerprint mismatch"},
    ]
    assert [r["bytes_received"] for r in rounds] == [6000, 3000, 4000]
    assert rounds[0]["train_loss"] == pytest.approx(data.commit(1, HOSPITALS).train_loss, rel=1e-12)

    final = report["final"]
    assert final["accuracy"] == rounds[2]["accuracy"] and final["loss"] == rounds[2]["loss"]
    assert final["epsilon_max"] == pytest.approx(eps("hospital-3", 3), rel=1e-12)
    assert (final["delta"], final["rounds_completed"], final["status"]) == (1e-5, 3, "finished")

    hospitals = report["hospitals"]
    assert list(hospitals) == list(HOSPITALS)
    # Cumulative steps (latest ledger row) so (noise_multiplier, sample_rate, steps) re-derive ε.
    assert [hospitals[h]["steps"] for h in HOSPITALS] == [30, 20, 30]
    assert [hospitals[h]["samples"] for h in HOSPITALS] == [100, 200, 300]
    assert [hospitals[h]["sample_rate"] for h in HOSPITALS] == pytest.approx([0.01, 0.02, 0.03])
    assert hospitals["hospital-2"]["epsilon"] == pytest.approx(eps("hospital-2", 2), rel=1e-12)
    assert {(v["noise_multiplier"], v["accountant"], v["delta"]) for v in hospitals.values()} == {
        (1.1, "prv", 1e-5)
    }


def test_write_report_writes_json_and_png(store: RoundStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_report(store, "bc", out)
    assert path == out / "report.json"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.png"]  # no tmp files
    assert json.loads(path.read_text()) == build_report(store, "bc").to_json()
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    write_report(store, "bc", out)  # overwriting works the same way
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.png"]


def test_failed_write_keeps_the_previous_report(
    store: RoundStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_report(store, "bc", tmp_path)
    before = path.read_bytes()
    job = store.get_job("bc")
    assert job is not None
    store.set_job_status(job.id, "stopped")  # the next report would differ

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_report(store, "bc", tmp_path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.png"]


def test_report_of_a_job_without_rounds(tmp_path: Path) -> None:
    with RoundStore("sqlite://") as s:
        s.open_job("empty", {"rounds": 2})
        report = build_report(s, "empty").to_json()
        assert report["rounds"] == [] and report["hospitals"] == {}
        assert report["final"] == {
            "accuracy": None,
            "loss": None,
            "metrics": {},
            "hospital_metrics": {},
            "epsilon_max": None,
            "delta": None,
            "rounds_completed": 0,
            "status": "running",
        }
        assert write_report(s, "empty", tmp_path).is_file()
        with pytest.raises(StoreError, match="no job 'nope'"):
            build_report(s, "nope")


def test_a_large_consortiums_epsilon_plot_shows_the_range_not_a_line_each() -> None:
    from matplotlib.figure import Figure

    from fedvault.coordinator.report import PLOT_EACH_UP_TO, Report, _plot_epsilon

    def report(hospitals: int) -> Report:
        names = [f"h{i:03d}" for i in range(hospitals)]
        rounds = [
            {
                "round": r,
                "participants": names,
                "epsilon": {h: 0.1 * r + 0.001 * i for i, h in enumerate(names)},
            }
            for r in (1, 2, 3)
        ]
        final = {"rounds_completed": 3, "status": "finished"}
        return Report.from_json(
            {"config": {}, "rounds": rounds, "final": final, "hospitals": {h: {} for h in names}}
        )

    small, large = Figure().subplots(), Figure().subplots()
    _plot_epsilon(small, report(PLOT_EACH_UP_TO))
    assert len(small.get_legend_handles_labels()[1]) == PLOT_EACH_UP_TO
    _plot_epsilon(large, report(400))
    labels = large.get_legend_handles_labels()[1]
    assert sorted(labels) == ["largest", "median", "range over 400 hospitals", "smallest"]
    largest = large.get_lines()[0].get_ydata()
    assert list(largest) == pytest.approx([0.1 * r + 0.399 for r in (1, 2, 3)])
