"""A hospital at its budget stays there across a restart.

Every ClientApp run opens the ledger file anew (Flower starts a process per
message), so after a daemon restart the only memory of past spending is that
file. Here the rounds are booked through one ledger object that is never
closed, as if its process had been killed; fresh objects on the same file must
see every booked step and refuse the next round. (The e2e test
``tests/integration/test_client_faults.py`` does the same with a real
``kill -9`` of a hospital daemon.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvault.client.ledger import LocalLedger
from fedvault.errors import BudgetExhaustedError
from fedvault.privacy.dp import compute_epsilon

DELTA, NM, SR, STEPS = 1e-5, 1.0, 0.1, 20
ACCOUNTANT = "rdp"  # ten times faster than PRV; what is tested does not depend on it


def _epsilon(steps: int) -> float:
    return compute_epsilon(
        noise_multiplier=NM, sample_rate=SR, steps=steps, delta=DELTA, accountant=ACCOUNTANT
    )


def _check(path: Path, server_round: int, budget: float) -> float:
    """One more round's projection, asked as a restarted hospital's ClientApp asks it."""
    with LocalLedger(path, hospital="hospital-2", accountant=ACCOUNTANT) as ledger:
        return ledger.check_round(
            job="job-a",
            server_round=server_round,
            noise_multiplier=NM,
            sample_rate=SR,
            steps=STEPS,
            budget=budget,
            delta=DELTA,
        )


def test_ledger_at_budget_refuses_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "hospital-2" / "ledger.sqlite"
    before = LocalLedger(path, hospital="hospital-2", accountant=ACCOUNTANT)  # never closed
    for n in (1, 2, 3):
        state = before.state("job-a").extended(noise_multiplier=NM, sample_rate=SR, steps=STEPS)
        before.record_round(job="job-a", server_round=n, state=state, delta=DELTA)
    budget = _epsilon(3 * STEPS)  # the hospital's cap: exactly what three rounds cost

    # After the restart: round 4 is refused, and so is a retry of round 3 (a
    # retrained round costs privacy again); a refusal books nothing.
    for server_round in (4, 3):
        with pytest.raises(BudgetExhaustedError, match=f"round {server_round} of job 'job-a'"):
            _check(path, server_round, budget)
    with LocalLedger(path, hospital="hospital-2", accountant=ACCOUNTANT) as after:
        assert [(e.server_round, e.attempt) for e in after.entries()] == [(1, 1), (2, 1), (3, 1)]
        assert after.state("job-a").steps == 3 * STEPS
        assert after.spent(delta=DELTA) == pytest.approx(budget, rel=1e-12)
    # With room for exactly one more round, the next round may train.
    assert _check(path, 4, _epsilon(4 * STEPS)) == pytest.approx(_epsilon(4 * STEPS), rel=1e-12)
