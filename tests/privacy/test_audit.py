"""The empirical privacy audit: the bound against hand-checkable cases, then end to end.

The bound (:mod:`fedvault.privacy.audit`) is one-run auditing (Steinke, Nasr and
Jagielski, 2023). End to end (``fedvault audit privacy``, small: 200 canaries,
3 rounds, ε = 1), the audit must refute the claim when DP is off and let it
stand with DP-SGD as planned, training through ``train_private``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom
from typer.testing import CliRunner

from fedvault.app.cli import app
from fedvault.errors import InvalidConfigError
from fedvault.privacy.audit import (
    audit_p_value,
    best_lower_bound,
    epsilon_lower_bound,
    score_guesses,
)

runner = CliRunner()
# Opacus hooks warn when inputs do not require grad; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _all_correct_bound(r: int, confidence: float) -> float:
    """Pure DP, r guesses all right: the bound solves q^r = 1 - confidence, ε = logit(q)."""
    q = (1 - confidence) ** (1 / r)
    return math.log(q / (1 - q))


@pytest.mark.parametrize("r", [10, 31, 62, 100, 1000])
def test_all_correct_guesses_match_the_closed_form(r: int) -> None:
    got = epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=0.0)
    assert got == pytest.approx(_all_correct_bound(r, 0.95), abs=1e-9)


def test_the_bound_grows_with_the_number_of_correct_guesses() -> None:
    bounds = [
        epsilon_lower_bound(canaries=1000, guesses=r, correct=r, delta=1e-5)
        for r in (10, 31, 62, 100, 1000)
    ]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
    # 31 perfect guesses cannot refute ε = 3 at 95%; 62 are needed (with δ = 0).
    assert bounds[1] < 2.3 < 3 < epsilon_lower_bound(canaries=62, guesses=62, correct=62, delta=0)


@pytest.mark.parametrize(("r", "v"), [(1000, 500), (1000, 480), (200, 100), (10, 0), (0, 0)])
def test_chance_level_guessing_refutes_nothing(r: int, v: int) -> None:
    assert epsilon_lower_bound(canaries=1000, guesses=r, correct=v, delta=1e-5) == 0.0


def test_the_bound_falls_as_the_confidence_rises() -> None:
    bounds = [
        epsilon_lower_bound(canaries=1000, guesses=200, correct=190, delta=1e-5, confidence=c)
        for c in (0.5, 0.9, 0.95, 0.99, 0.999)
    ]
    assert bounds == sorted(bounds, reverse=True) and len(set(bounds)) == len(bounds)


def test_delta_only_weakens_the_bound() -> None:
    pure = epsilon_lower_bound(canaries=1000, guesses=200, correct=195, delta=0.0)
    approx = epsilon_lower_bound(canaries=1000, guesses=200, correct=195, delta=1e-5)
    loose = epsilon_lower_bound(canaries=1000, guesses=200, correct=195, delta=1e-3)
    assert pure > approx > loose >= 0.0


def test_p_value_is_the_binomial_tail_plus_the_delta_term() -> None:
    # ε = 0, δ = 0: a fair coin per guess, P[4 of 4] = 1/16.
    assert audit_p_value(canaries=4, guesses=4, correct=4, epsilon=0.0, delta=0.0) == 1 / 16
    # δ > 0 adds 2 m δ max_i P[v > W >= v - i] / i. Over i = 1..4 that is
    # max(4, (4 + 6)/2, (4 + 6 + 4)/3, 15/4)/16: i = 2 wins, 5/16.
    got = audit_p_value(canaries=4, guesses=4, correct=4, epsilon=0.0, delta=0.01)
    assert got == pytest.approx(1 / 16 + 2 * 4 * 0.01 * 5 / 16)
    q = 1 / (1 + math.exp(-2.0))
    tail = binom.sf(89, 100, q)
    assert audit_p_value(canaries=100, guesses=100, correct=90, epsilon=2.0, delta=0) == (
        pytest.approx(tail)
    )


def test_guesses_take_the_extremes_and_count_hits() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.7])
    included = np.array([True, False, False, False, True, True])
    g = score_guesses(scores, included, 2, 2)  # in: 0.9, 0.8; out: 0.1, 0.2
    assert (g.guesses, g.correct) == (4, 3)
    assert score_guesses(scores, included, 0, 0).guesses == 0


def test_best_of_several_rules_pays_a_union_bound() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    scores = included + rng.normal(0, 0.3, 400)
    audit = best_lower_bound(scores, included, delta=1e-5, confidence=0.95)
    assert len(audit.rules) == 6
    assert audit.epsilon == max(b for _, b in audit.rules) > 0
    best = audit.best
    single = epsilon_lower_bound(
        canaries=400, guesses=best.guesses, correct=best.correct, delta=1e-5, confidence=0.95
    )
    assert audit.epsilon < single  # each rule is held to 1 - 0.05/6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"canaries": 10, "guesses": 11, "correct": 5, "delta": 0.0},
        {"canaries": 10, "guesses": 5, "correct": 6, "delta": 0.0},
        {"canaries": 10, "guesses": 5, "correct": 5, "delta": 1.0},
        {"canaries": 10, "guesses": 5, "correct": 5, "delta": 0.0, "confidence": 1.0},
        {"canaries": -1, "guesses": 0, "correct": 0, "delta": 0.0},
    ],
)
def test_bad_counts_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidConfigError):
        epsilon_lower_bound(**kwargs)  # type: ignore[arg-type]


# --- end to end ------------------------------------------------------------------

SMALL = ["--canaries", "200", "--rounds", "3", "--epsilon", "1"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--canaries", "1"], "canaries must be an integer from 2"),
        (["--confidence", "1.5"], "confidence"),
        (["--noise-scale", "0"], "noise_scale"),
        (["--epsilon", "0"], "epsilon"),
        (["--task", "diabetes"], "needs labelled canaries"),
        (["--task", "no-such-task"], "unknown task"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", "privacy", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0]
    assert not out.exists()


def test_with_dp_off_the_audit_refutes_the_claim(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["audit", "privacy", *SMALL, "--no-dp", "--out", str(tmp_path / "off")]
    )
    assert result.exit_code == 1, result.output
    assert "refuted" in result.output
    saved = json.loads((tmp_path / "off" / "privacy-audit.json").read_text())
    assert saved["noise_multiplier"] < 1e-6 < saved["planned_noise_multiplier"]
    assert saved["claimed_epsilon"] <= 1.0
    assert saved["lower_bound"] > 2.0 > saved["claimed_epsilon"]
    assert saved["run_epsilon"] is None and not saved["holds"]
    assert (tmp_path / "off" / "privacy-audit.png").stat().st_size > 0


def test_with_dp_sgd_as_planned_the_claim_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedvault.client.training as training

    calls: list[float] = []
    real = training.train_private

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs["plan"].noise_multiplier)  # type: ignore[attr-defined]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "train_private", spy)
    result = runner.invoke(app, ["audit", "privacy", *SMALL, "--out", str(tmp_path / "on")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "on" / "privacy-audit.json").read_text())
    assert calls == [saved["planned_noise_multiplier"]] * 3  # fedvault's training, 3 rounds
    assert saved["run_epsilon"] == pytest.approx(saved["claimed_epsilon"])
    assert 0.9 < saved["claimed_epsilon"] <= 1.0
    assert saved["lower_bound"] <= saved["claimed_epsilon"] and saved["holds"]
    assert saved["canaries"] == 200 == len(saved["scores_in"]) + len(saved["scores_out"])
