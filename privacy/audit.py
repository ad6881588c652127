"""From a membership-inference game to a lower bound on ε: one-run privacy auditing.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023 (arXiv:2305.08846). The game: ``m`` canaries, each included in
the training data independently with probability 1/2 (``S_i = ±1``); one
training run; the auditor looks at the output and guesses ``T_i ∈ {-1, 0, +1}``
for each canary (0: abstain), at most ``r`` non-zero guesses. ``W`` is the
number of correct guesses (``T_i = S_i``).

The statement implemented is the paper's main theorem for approximate DP
(Theorem 3 in the arXiv version): if the training algorithm is (ε, δ)-DP
(add/remove one record), then for every ``v``

    P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i = 1..v} (f(v − i) − f(v)) / i,
    f(k) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ k],

that is: correct guesses are stochastically dominated by a Binomial with the
accuracy of ε-randomised response, plus a δ term. The right-hand side is the
p-value of observing ``v`` correct guesses under the hypothesis "the
algorithm is (ε, δ)-DP"; :func:`epsilon_lower_bound` is the largest ε that
the observation rejects at level ``1 - confidence``, found by bisection as in
the paper's own procedure (its Algorithm/appendix code: p-value, then a
binary search on ε). With δ = 0 this is the pure-DP statement: the bound is
the largest ε with ``P[Binomial(r, e^ε/(1+e^ε)) ≥ v] ≤ 1 - confidence``.

The theorem asks nothing of the algorithm beyond (ε, δ)-DP and nothing of the
guesses beyond being a function of the output, so the bound holds whatever
the training did; it is only as *strong* as the membership signal.

A pure library: numpy and scipy (scikit-learn's dependency) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedvault.errors import InvalidConfigError

__all__ = [
    "DEFAULT_GUESS_FRACTIONS",
    "AuditBound",
    "GuessOutcome",
    "audit_p_value",
    "best_lower_bound",
    "epsilon_lower_bound",
    "score_guesses",
]

#: Halvings of the bracket around the bound: 60 leave it exact to float precision.
_BISECTION_STEPS = 60
#: The guessing rules :func:`best_lower_bound` tries, as the fraction of the
#: canaries guessed (half "in" from the top scores, half "out" from the bottom).
DEFAULT_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("canaries", m), ("guesses", r), ("correct", v)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
            raise InvalidConfigError(f"{name} must be an integer >= 0 (got {value!r})")
    if not v <= r <= m:
        raise InvalidConfigError(
            f"need correct <= guesses <= canaries (got correct={v}, guesses={r}, canaries={m})"
        )


def _check_delta(delta: float) -> None:
    if not isinstance(delta, int | float) or isinstance(delta, bool) or not 0 <= delta < 1:
        raise InvalidConfigError(f"delta must be a number with 0 <= delta < 1 (got {delta!r})")


def _check_confidence(confidence: float) -> None:
    if (
        not isinstance(confidence, int | float)
        or isinstance(confidence, bool)
        or not 0 < confidence < 1
    ):
        raise InvalidConfigError(
            f"confidence must be a number with 0 < confidence < 1 (got {confidence!r}), e.g. 0.95"
        )


def audit_p_value(
    *, canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """P[≥ ``correct`` of ``guesses`` right] bounded under "(ε, δ)-DP" (the theorem's right side).

    ``canaries`` is ``m``: every randomised canary, guessed or not (it scales
    the δ term).
    """
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    if not math.isfinite(epsilon) or epsilon < 0:
        raise InvalidConfigError(f"epsilon must be a finite number >= 0 (got {epsilon!r})")
    from scipy.stats import binom

    m, r, v = canaries, guesses, correct
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-randomised response
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v > Binomial >= v - i] = pmf(v-1) + ... + pmf(v-i)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest ε that ``correct`` right guesses out of ``guesses`` refute.

    With probability at least ``confidence`` (over the canaries' coins and the
    training's randomness), an (ε, δ)-DP algorithm has ε at least this value.
    0.0 when the guesses refute nothing (no better than chance, or too few).
    """
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    _check_confidence(confidence)
    beta = 1.0 - confidence

    def rejects(eps: float) -> bool:
        p = audit_p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta
        )
        return p <= beta

    if guesses == 0 or not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):  # terminates: as ε grows, q -> 1 and the tail -> 1 > beta
        low, high = high, 2 * high
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if rejects(mid):
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class GuessOutcome:
    """One guessing rule's result: ``k_in`` "in" guesses, ``k_out`` "out", how many right."""

    k_in: int
    k_out: int
    correct: int

    @property
    def guesses(self) -> int:
        """Non-abstaining guesses (``r`` in the theorem)."""
        return self.k_in + self.k_out


def score_guesses(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> GuessOutcome:
    """Guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest; count hits.

    Ties are broken by canary index (a rule fixed before looking), never by
    membership.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise InvalidConfigError("scores and memberships must be 1-D arrays of the same length")
    m = len(scores)
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise InvalidConfigError(
            f"need 0 <= k_in, k_out and k_in + k_out <= canaries (got {k_in}, {k_out}, {m})"
        )
    if not np.all(np.isfinite(scores)):
        raise InvalidConfigError("a canary score is not finite; the model diverged")
    order = np.argsort(-scores, kind="stable")  # highest first, ties by index
    guessed_in = order[:k_in]
    guessed_out = order[m - k_out :] if k_out else order[:0]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return GuessOutcome(k_in=k_in, k_out=k_out, correct=correct)


@dataclass(frozen=True)
class AuditBound:
    """The audit's verdict: the best rule's lower bound, and every rule tried."""

    epsilon: float  # the lower bound at ``confidence`` (0.0: nothing refuted)
    confidence: float
    delta: float
    canaries: int
    best: GuessOutcome
    rules: tuple[tuple[GuessOutcome, float], ...]  # each rule and its own bound


def best_lower_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS,
) -> AuditBound:
    """The largest lower bound over a fixed set of guessing rules, valid at ``confidence``.

    Rule ``f`` guesses ``round(f·m/2)`` canaries "in" (the highest scores) and
    as many "out" (the lowest). Picking the best of ``k`` rules after seeing
    the scores is paid for by a union bound: each rule's bound is taken at
    confidence ``1 - (1 - confidence)/k``, so the maximum holds at
    ``confidence`` (the paper's sweep over the number of guesses, made valid).
    """
    _check_confidence(confidence)
    included = np.asarray(included, dtype=bool)
    m = len(included)
    if m == 0:
        raise InvalidConfigError("the audit needs at least one canary")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise InvalidConfigError(f"guess fractions must lie in (0, 1] (got {fractions!r})")
    each = 1.0 - (1.0 - confidence) / len(fractions)
    rules = []
    for f in fractions:
        k = max(1, round(f * m / 2))
        k_in, k_out = min(k, m), min(k, m - min(k, m))
        outcome = score_guesses(scores, included, k_in, k_out)
        bound = epsilon_lower_bound(
            canaries=m,
            guesses=outcome.guesses,
            correct=outcome.correct,
            delta=delta,
            confidence=each,
        )
        rules.append((outcome, bound))
    best_outcome, best_bound = max(rules, key=lambda rule: rule[1])
    return AuditBound(
        epsilon=best_bound,
        confidence=confidence,
        delta=delta,
        canaries=m,
        best=best_outcome,
        rules=tuple(rules),
    )
