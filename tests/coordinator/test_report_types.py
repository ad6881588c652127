"""The report's types: report.json and the relayed summary as dataclasses, written by
``to_json`` and read back by ``from_json``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedvault.coordinator.report import (
    FinalReport,
    HospitalPrivacy,
    Report,
    ReportSummary,
    RoundReport,
    summarise,
)
from fedvault.errors import InvalidConfigError

HOSPITAL = HospitalPrivacy(
    samples=100,
    noise_multiplier=1.1,
    sample_rate=0.01,
    steps=20,
    accountant="prv",
    epsilon=0.61,
    delta=1e-5,
)
ROUNDS = (
    RoundReport(
        round=1,
        accuracy=0.8,
        loss=0.5,
        metrics={"auroc": 0.9, "loss": 0.5},
        hospital_metrics={"hospital-1": {"auroc": 0.88}},
        epsilon={"hospital-1": 0.31, "hospital-2": 0.32},
        participants=("hospital-1", "hospital-2"),
        train_loss=0.7,
        bytes_received=3000,
    ),
    RoundReport(
        round=2,
        accuracy=0.85,
        loss=0.4,
        metrics={"auroc": 0.93},
        epsilon={"hospital-1": 0.61, "hospital-2": 0.32},
        participants=("hospital-1",),
        refused={"hospital-2": "budget exhausted"},
        bytes_received=1500,
    ),
)
REPORT = Report(
    config={"job": "bc", "task": "breast-cancer", "rounds": 2, "privacy": {"epsilon": 1.0}},
    rounds=ROUNDS,
    final=FinalReport(
        accuracy=0.85,
        loss=0.4,
        metrics={"auroc": 0.93},
        hospital_metrics={},
        epsilon_max=0.61,
        delta=1e-5,
        rounds_completed=2,
        status="finished",
    ),
    hospitals={"hospital-1": HOSPITAL, "hospital-2": HospitalPrivacy(samples=200)},
)


def _through_json(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data, allow_nan=False))


def test_report_round_trips_through_json() -> None:
    data = REPORT.to_json()
    assert Report.from_json(_through_json(data)) == REPORT
    assert list(data) == ["config", "rounds", "final", "hospitals"]
    assert list(data["rounds"][0]) == [
        "round",
        "accuracy",
        "loss",
        "metrics",
        "hospital_metrics",
        "epsilon",
        "participants",
        "refused",
        "rejected",
        "failed",
        "train_loss",
        "bytes_received",
    ]
    assert data["rounds"][1]["participants"] == ["hospital-1"]  # a list in JSON
    assert list(data["final"]) == [
        "accuracy",
        "loss",
        "metrics",
        "hospital_metrics",
        "epsilon_max",
        "delta",
        "rounds_completed",
        "status",
    ]
    assert data["hospitals"]["hospital-2"] == {
        "samples": 200,
        "noise_multiplier": None,
        "sample_rate": None,
        "steps": None,
        "accountant": None,
        "epsilon": None,
        "delta": None,
    }


def test_summary_round_trips_and_keeps_only_metrics_and_epsilon_per_round() -> None:
    summary = summarise(REPORT, consortium="north")
    data = summary.to_json()
    assert ReportSummary.from_json(_through_json(data)) == summary
    assert (data["consortium"], data["job"], data["task"]) == ("north", "bc", "breast-cancer")
    assert data["rounds"][0] == {
        "round": 1,
        "metrics": {"auroc": 0.9, "loss": 0.5},
        "epsilon": {"hospital-1": 0.31, "hospital-2": 0.32},
        "epsilon_max": 0.32,
    }
    assert data["final"] == REPORT.final.to_json()
    assert data["hospitals"] == REPORT.to_json()["hospitals"]
    assert data["hospitals_not_listed"] == 0


def test_a_large_consortiums_summary_keeps_the_largest_epsilon_not_every_hospital() -> None:
    # Relayed to every hospital with every instruction: listing each hospital would make
    # the relay grow with the square of the consortium.
    summary = summarise(REPORT, consortium="north", lists_up_to=1)
    data = summary.to_json()
    assert ReportSummary.from_json(_through_json(data)) == summary
    assert data["rounds"][0] == {
        "round": 1,
        "metrics": {"auroc": 0.9, "loss": 0.5},
        "epsilon": {},
        "epsilon_max": 0.32,
    }
    assert (data["hospitals"], data["hospitals_not_listed"]) == ({}, 2)
    assert data["final"]["hospital_metrics"] == {}
    assert data["final"]["epsilon_max"] == REPORT.final.epsilon_max
    assert data["final"]["metrics"] == REPORT.final.to_json()["metrics"]
    # A summary relayed before these fields existed still reads back.
    old = summarise(REPORT).to_json()
    del old["hospitals_not_listed"]
    for r in old["rounds"]:
        del r["epsilon_max"]
    assert ReportSummary.from_json(_through_json(old)).hospitals_not_listed == 0


def test_a_report_written_before_task_metrics_reads_back() -> None:
    old = {
        "config": {"example": "breast-cancer"},
        "rounds": [
            {"round": 1, "accuracy": 0.9, "loss": 0.3, "epsilon": {"h": 0.2}, "participants": ["h"]}
        ],
        "final": {"accuracy": 0.9, "loss": 0.3, "rounds_completed": 1, "status": "finished"},
        "hospitals": {"h": {"samples": 10, "epsilon": 0.2}},
    }
    report = Report.from_json(old)
    (r,) = report.rounds
    assert (r.metrics, r.hospital_metrics, r.refused, r.bytes_received) == ({}, {}, {}, 0)
    assert (report.final.metrics, report.final.epsilon_max) == ({}, None)
    assert report.hospitals["h"] == HospitalPrivacy(samples=10, epsilon=0.2)
    assert Report.from_json({**old, "out_dir": "/tmp/x"}) == report  # unknown keys: ignored


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.pop("final"), r"report\.json lacks 'final'"),
        (lambda d: d["rounds"][1].pop("round"), r"report\.json\.rounds\[1\] lacks 'round'"),
        (
            lambda d: d["rounds"][0].update(round="1"),
            r"report\.json\.rounds\[0\]: 'round' must be an integer \(got str '1'\)",
        ),
        (
            lambda d: d["rounds"][0]["epsilon"].update(h="high"),
            r"rounds\[0\]: 'epsilon' must be an object of numbers",
        ),
        (
            lambda d: d["final"].update(rounds_completed=True),
            r"report\.json\.final: 'rounds_completed' must be an integer \(got bool True\)",
        ),
        (
            lambda d: d["hospitals"]["hospital-1"].update(epsilon="0.6"),
            r"hospitals\['hospital-1'\]: 'epsilon' must be a number or null",
        ),
        (lambda d: d.update(rounds={}), r"'rounds' must be a list of objects"),
        (lambda d: d["rounds"].append(3), r"report\.json\.rounds\[2\] must be a JSON object"),
    ],
)
def test_a_malformed_report_names_the_key(change: Any, match: str) -> None:
    data = _through_json(REPORT.to_json())
    change(data)
    with pytest.raises(InvalidConfigError, match=match):
        Report.from_json(data)


def test_a_report_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidConfigError, match=r"report\.json must be a JSON object"):
        Report.from_json([])  # type: ignore[arg-type]
