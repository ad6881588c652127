"""Plaintext FedAvg: the weighted average, its dtypes, and every refusal."""

from __future__ import annotations

import numpy as np
import pytest

from fedvault.coordinator.aggregation import PlainFedAvg
from fedvault.errors import MalformedUpdateError

WEIGHTS = (3.0, 50.0, 1234.0)


def _update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((40, 25)).astype(np.float32),
        "b": rng.standard_normal(7),
        "h": rng.standard_normal(5).astype(np.float16),
    }


def test_weighted_average_matches_float64_reference() -> None:
    rng = np.random.default_rng(0)
    updates = [_update(rng) for _ in WEIGHTS]
    agg = PlainFedAvg()
    for update, weight in zip(updates, WEIGHTS, strict=True):
        read_only = {k: v.copy() for k, v in update.items()}
        for v in read_only.values():
            v.flags.writeable = False  # as Flower hands them over
        agg.add(read_only, weight=weight)
    assert (agg.count, agg.total_weight) == (3, sum(WEIGHTS))
    avg = agg.result()
    for name in updates[0]:
        expected = sum(
            w * u[name].astype(np.float64) for u, w in zip(updates, WEIGHTS, strict=True)
        ) / sum(WEIGHTS)
        assert avg[name].dtype == updates[0][name].dtype and avg[name].shape == expected.shape
        tol = {"w": 1e-6, "b": 1e-12, "h": 1e-3}[name]  # float32 / float64 / float16 output
        np.testing.assert_allclose(avg[name], expected, rtol=tol, atol=tol)
    for name, value in agg.result().items():  # result() does not consume the sum
        np.testing.assert_array_equal(value, avg[name])


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda u: u.update(w=np.full((40, 25), np.nan, dtype=np.float32)), "NaN or Inf"),
        (lambda u: u["b"].__setitem__(3, np.inf), "NaN or Inf"),
        (lambda u: u.update(w=np.ones((25, 40), dtype=np.float32)), "shape"),
        (lambda u: u.update(w=np.ones((40, 25), dtype=np.int64)), "expected floats"),
        (lambda u: u.pop("h"), "layout differs"),
    ],
)
def test_refusals_leave_sum_untouched(edit, needle: str) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    good = _update(rng)
    agg = PlainFedAvg()
    agg.add(good, weight=2.0)
    before = agg.result()
    bad = {k: v.copy() for k, v in _update(rng).items()}
    edit(bad)
    with pytest.raises(MalformedUpdateError, match=needle):
        agg.add(bad, weight=1.0)
    assert (agg.count, agg.total_weight) == (1, 2.0)
    for name, value in agg.result().items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weight_refused(weight: float) -> None:
    with pytest.raises(MalformedUpdateError, match="sample weight"):
        PlainFedAvg().add({"w": np.ones(2)}, weight=weight)


def test_overflow_and_empty_detected() -> None:
    with pytest.raises(MalformedUpdateError, match="no update"):
        PlainFedAvg().result()
    agg = PlainFedAvg()
    agg.add({"w": np.full(3, 3e38, dtype=np.float32)}, weight=1.0)
    # The update that would overflow the sum is refused; the round goes on without it.
    with pytest.raises(MalformedUpdateError, match="overflowed"):
        agg.add({"w": np.full(3, 3e38, dtype=np.float32)}, weight=1.0)
    with pytest.raises(MalformedUpdateError, match="overflowed"):
        PlainFedAvg().add({"w": np.full(3, 3e38, dtype=np.float32)}, weight=10.0)
    agg.add({"w": np.full(3, -1e38, dtype=np.float32)}, weight=1.0)
    assert agg.count == 2
    np.testing.assert_allclose(agg.result()["w"], np.full(3, 1e38), rtol=1e-6)


def test_many_updates_reuse_buffers_without_aliasing() -> None:
    """The spare buffer is the previous sum: no result may alias the live sum."""
    rng = np.random.default_rng(2)
    updates = [{"w": rng.standard_normal(1000).astype(np.float32)} for _ in range(5)]
    agg = PlainFedAvg()
    first = None
    for k, update in enumerate(updates):
        agg.add(update, weight=float(k + 1))
        if first is None:
            first = agg.result()["w"].copy()
    expected = sum((k + 1) * u["w"].astype(np.float64) for k, u in enumerate(updates)) / 15.0
    np.testing.assert_allclose(agg.result()["w"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(first, updates[0]["w"])
