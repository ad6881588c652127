"""The ServerApp's incremental report equals the report built from the whole store.

:class:`ReportBuilder` re-reads only the newest rounds after the first build;
replayed here in the order the round loop writes (each commit also records the
evaluation of the round before it, failed attempts between, the last round's
evaluation and the job's status at the end), every build must equal
:func:`build_report` of the same store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from fedvault.coordinator.records import HospitalEval, Participation
from fedvault.coordinator.report import ReportBuilder, build_report
from fedvault.coordinator.store import RoundStore

if TYPE_CHECKING:  # fixtures' types; conftest is not importable under --import-mode=importlib
    from conftest import Rounds

CONFIG = {"example": "breast-cancer", "rounds": 4, "epsilon": 2.0, "delta": 1e-5}
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")


def _evals(number: int, hospitals: tuple[str, ...] = HOSPITALS) -> tuple[HospitalEval, ...]:
    return tuple(
        HospitalEval(hospital=h, accuracy=0.5 + 0.1 * number, loss=1.0 / number, samples=10 * i)
        for i, h in enumerate(hospitals, start=1)
    )


@pytest.fixture
def store() -> Iterator[RoundStore]:
    with RoundStore("sqlite://") as s:
        yield s


def test_every_build_equals_the_report_of_the_whole_store(store: RoundStore, data: Rounds) -> None:
    job = store.open_job("bc", CONFIG)
    builder = ReportBuilder(store, "bc")
    assert builder.build() == build_report(store, "bc")  # nothing committed yet
    assert builder.newest is None
    steps = [
        data.commit(1, HOSPITALS),
        # Round 2: hospital-3 refuses; round 1's evaluation comes with the commit.
        replace(
            data.commit(2, HOSPITALS[:2], refused=["hospital-3"]), previous_evaluations=_evals(1)
        ),
        # Round 3: hospital-2 rejected; hospital-4 only evaluated round 2 (never trained).
        replace(
            data.commit(3, ["hospital-1", "hospital-3"], rejected=["hospital-2"]),
            previous_evaluations=_evals(2, (*HOSPITALS, "hospital-4")),
            previous_pooled={"accuracy": 0.7},
        ),
        replace(data.commit(4, HOSPITALS), previous_evaluations=_evals(3)),
    ]
    for commit in steps:
        if commit.number == 3:  # a failed attempt before the commit: not in any report
            store.record_failed_round(
                job.id,
                3,
                reason="too few replies",
                participations=[Participation(hospital="hospital-1", status="failed")],
            )
        store.commit_round(job.id, commit)
        report = builder.build()
        assert report == build_report(store, "bc")
        assert builder.newest is not None and builder.newest.number == commit.number
        assert [r.round for r in report.rounds] == list(range(1, commit.number + 1))
    # The job's end: the last model's own evaluation, then its status.
    store.record_evaluation(job.id, 4, evaluations=_evals(4), pooled={"accuracy": 0.9})
    assert builder.build() == build_report(store, "bc")
    assert builder.build().final.accuracy == pytest.approx(0.9)
    store.set_job_status(job.id, "finished")
    final = builder.build()
    assert final == build_report(store, "bc")
    assert final.final.status == "finished"
    assert final.rounds[0].metrics == {} and final.rounds[1].metrics == {"accuracy": 0.7}


def test_a_builder_reads_only_the_newest_rounds_after_the_first_build(
    store: RoundStore, data: Rounds, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = store.open_job("bc", CONFIG)
    builder = ReportBuilder(store, "bc")
    for number in (1, 2, 3):
        store.commit_round(job.id, data.commit(number, HOSPITALS))
        builder.build()
    asked: list[int] = []
    rounds = store.rounds

    def spy(job_id: int, *, after: int = 0) -> list:  # type: ignore[type-arg]
        asked.append(after)
        return rounds(job_id, after=after)

    monkeypatch.setattr(store, "rounds", spy)
    store.commit_round(job.id, data.commit(4, HOSPITALS))
    assert builder.build() == build_report(store, "bc")
    assert asked == [2, 0]  # the builder's read: rounds 3 and 4; build_report's: all
