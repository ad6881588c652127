"""The hospital's local privacy ledger: accumulation, persistence, refusals."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedvault.client.ledger import LocalLedger
from fedvault.errors import (
    BudgetExhaustedError,
    InvalidConfigError,
    StoreError,
)
from fedvault.privacy.dp import AccountantState, compute_epsilon

DELTA = 1e-5
NM, SR, STEPS = 1.0, 0.1, 20  # one round: 20 DP-SGD steps


def _eps(steps: int, nm: float = NM, sr: float = SR) -> float:
    return compute_epsilon(noise_multiplier=nm, sample_rate=sr, steps=steps, delta=DELTA)


def _after(
    state: AccountantState, steps: int = STEPS, nm: float = NM, sr: float = SR
) -> AccountantState:
    """The accountant state a round of training would produce from ``state``."""
    return state.extended(noise_multiplier=nm, sample_rate=sr, steps=steps)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "hospital-2" / "ledger.sqlite"  # parent dirs created


def _train_rounds(ledger: LocalLedger, job: str, rounds: range) -> AccountantState:
    for server_round in rounds:
        state = _after(ledger.state(job))
        ledger.record_round(job=job, server_round=server_round, state=state, delta=DELTA)
    return ledger.state(job)


def test_records_accumulate(path: Path) -> None:
    with LocalLedger(path, hospital="hospital-2") as ledger:
        assert ledger.state("job-a") == AccountantState()
        assert ledger.spent(delta=DELTA) == 0.0
        first = ledger.record_round(
            job="job-a", server_round=1, state=_after(AccountantState()), delta=DELTA
        )
        second = ledger.record_round(
            job="job-a", server_round=2, state=_after(ledger.state("job-a")), delta=DELTA
        )
        assert ledger.state("job-a").history == ((NM, SR, 2 * STEPS),)
        assert (first.steps, second.steps) == (STEPS, STEPS)
        assert (first.attempt, second.attempt) == (1, 1)
        assert first.epsilon == pytest.approx(_eps(STEPS), rel=1e-12)
        assert second.epsilon == pytest.approx(_eps(2 * STEPS), rel=1e-12)
        assert second.epsilon > first.epsilon
        assert ledger.spent(delta=DELTA) == pytest.approx(second.epsilon, rel=1e-12)
        assert (second.noise_multiplier, second.sample_rate, second.accountant) == (NM, SR, "prv")
        now = datetime.now(UTC)
        assert now - timedelta(minutes=1) < second.recorded_at <= now
        assert ledger.entries("job-a") == [first, second]


def test_survives_reopening(path: Path) -> None:
    ledger = LocalLedger(path, hospital="hospital-2")
    state = _train_rounds(ledger, "job-a", range(1, 4))
    entries = ledger.entries()
    ledger.close()

    reopened = LocalLedger(path, hospital="hospital-2")
    try:
        assert reopened.state("job-a") == state
        assert reopened.state("job-a").steps == 3 * STEPS
        assert reopened.entries() == entries
        assert reopened.spent(delta=DELTA) == pytest.approx(_eps(3 * STEPS), rel=1e-12)
        # ... and keeps accumulating from where it was.
        _train_rounds(reopened, "job-a", range(4, 5))
        assert reopened.state("job-a").steps == 4 * STEPS
    finally:
        reopened.close()


def test_retrained_round_costs_again_and_is_never_overwritten(path: Path) -> None:
    with LocalLedger(path, hospital="hospital-2") as ledger:
        _train_rounds(ledger, "job-a", range(1, 3))
        # Round 2 is re-trained after a coordinator crash: another 20 steps spent.
        retry = ledger.record_round(
            job="job-a", server_round=2, state=_after(ledger.state("job-a")), delta=DELTA
        )
        assert retry.attempt == 2
        assert [(e.server_round, e.attempt) for e in ledger.entries()] == [(1, 1), (2, 1), (2, 2)]
        assert ledger.state("job-a").steps == 3 * STEPS
        assert retry.epsilon == pytest.approx(_eps(3 * STEPS), rel=1e-12)


def test_refuses_a_state_that_forgets_recorded_steps(path: Path) -> None:
    with LocalLedger(path, hospital="hospital-2") as ledger:
        _train_rounds(ledger, "job-a", range(1, 3))
        # A fresh accountant (the per-round PrivacyEngine bug) would under-report.
        with pytest.raises(InvalidConfigError, match="does not extend"):
            ledger.record_round(
                job="job-a", server_round=3, state=_after(AccountantState()), delta=DELTA
            )
        # Re-recording the same state (no new step) is refused too.
        with pytest.raises(InvalidConfigError, match="does not extend"):
            ledger.record_round(
                job="job-a", server_round=3, state=ledger.state("job-a"), delta=DELTA
            )
        assert len(ledger.entries()) == 2


def test_check_round_refuses_past_budget(path: Path) -> None:
    with LocalLedger(path, hospital="hospital-2") as ledger:
        _train_rounds(ledger, "job-x", range(1, 3))
        spent, projected = _eps(2 * STEPS), _eps(3 * STEPS)
        # Within budget: returns the projection over all jobs.
        ok = ledger.check_round(
            job="job-x",
            server_round=3,
            noise_multiplier=NM,
            sample_rate=SR,
            steps=STEPS,
            budget=projected + 0.01,
            delta=DELTA,
        )
        assert ok == pytest.approx(projected, rel=1e-12)
        # Exactly at the budget is allowed (tolerance 1e-9), just past it is not.
        ledger.check_round(
            job="job-x",
            server_round=3,
            noise_multiplier=NM,
            sample_rate=SR,
            steps=STEPS,
            budget=projected,
            delta=DELTA,
        )
        budget = (spent + projected) / 2
        with pytest.raises(BudgetExhaustedError) as info:
            ledger.check_round(
                job="job-x",
                server_round=3,
                noise_multiplier=NM,
                sample_rate=SR,
                steps=STEPS,
                budget=budget,
                delta=DELTA,
            )
        reason = str(info.value)
        assert reason.startswith("hospital-2: round 3 of job 'job-x'")
        assert f"epsilon to {projected:.2f} > budget {budget:.2f}" in reason
        assert f"spent so far {spent:.2f}" in reason
        assert "delta=1e-05" in reason
        assert "raise the budget" in reason
        # A refused round leaves no trace.
        assert len(ledger.entries()) == 2
        assert ledger.state("job-x").steps == 2 * STEPS


def test_jobs_on_the_same_data_compose(path: Path) -> None:
    with LocalLedger(path, hospital="hospital-2") as ledger:
        a = _train_rounds(ledger, "job-a", range(1, 3))
        b_state = _after(AccountantState(), steps=30, nm=1.5, sr=0.05)
        ledger.record_round(job="job-b", server_round=1, state=b_state, delta=DELTA)
        total = ledger.total_state()
        assert sorted(total.history) == sorted(a.history + b_state.history)
        eps_a, eps_b = a.epsilon(DELTA), b_state.epsilon(DELTA)
        assert ledger.spent(delta=DELTA) > max(eps_a, eps_b)
        assert [e.job for e in ledger.entries("job-b")] == ["job-b"]
        # Job b's next round fits a budget on its own, but not on top of job a.
        b_alone = _after(b_state, steps=30, nm=1.5, sr=0.05).epsilon(DELTA)
        together = total.extended(noise_multiplier=1.5, sample_rate=0.05, steps=30).epsilon(DELTA)
        assert b_alone < together
        with pytest.raises(BudgetExhaustedError, match="round 2 of job 'job-b'"):
            ledger.check_round(
                job="job-b",
                server_round=2,
                noise_multiplier=1.5,
                sample_rate=0.05,
                steps=30,
                budget=(b_alone + together) / 2,
                delta=DELTA,
            )


def test_ledger_belongs_to_one_hospital(path: Path) -> None:
    with LocalLedger(path, hospital="hospital-2") as ledger:
        _train_rounds(ledger, "job-a", range(1, 2))
    with pytest.raises(StoreError, match="belongs to hospital-2"):
        LocalLedger(path, hospital="hospital-3")


def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(StoreError, match="writable"):
        LocalLedger(blocker / "ledger.sqlite", hospital="hospital-2")


def test_check_round_validates_budget(path: Path) -> None:
    with (
        LocalLedger(path, hospital="hospital-2") as ledger,
        pytest.raises(InvalidConfigError, match="budget"),
    ):
        ledger.check_round(
            job="j",
            server_round=1,
            noise_multiplier=NM,
            sample_rate=SR,
            steps=STEPS,
            budget=0.0,
            delta=DELTA,
        )


def test_corrupt_row_is_a_store_error(path: Path) -> None:
    with LocalLedger(path, hospital="hospital-2") as ledger:
        _train_rounds(ledger, "job-a", range(1, 2))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE local_privacy_ledger SET state_json = 'garbage'")
    with (
        LocalLedger(path, hospital="hospital-2") as ledger,
        pytest.raises(StoreError, match="corrupt state for job 'job-a'"),
    ):
        ledger.spent(delta=DELTA)
