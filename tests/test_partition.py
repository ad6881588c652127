"""Tests for fedvault.partition: parsing, coverage, determinism and label skew."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedvault.errors import DataError, InvalidConfigError
from fedvault.partition import Partition, partition_indices

# 10 classes x 100 samples, in class order (the worst case for a lazy split).
LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", Partition("iid")),
        (" iid ", Partition("iid")),
        ("dirichlet:0.5", Partition("dirichlet", 0.5)),
        ("dirichlet:100", Partition("dirichlet", 100.0)),
        ("dirichlet:1e-2", Partition("dirichlet", 0.01)),
    ],
)
def test_parse_good(text: str, expected: Partition) -> None:
    parsed = Partition.parse(text)
    assert parsed == expected
    assert Partition.parse(str(parsed)) == parsed


def test_str() -> None:
    assert str(Partition("iid")) == "iid"
    assert str(Partition("dirichlet", 0.5)) == "dirichlet:0.5"
    assert str(Partition("dirichlet", 0.1 + 0.2)) == "dirichlet:0.30000000000000004"


@pytest.mark.parametrize(
    "text",
    [
        "dirichlet:x",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:nan",
        "dirichlet:inf",
        "dirichlet:",
        "dirichlet",
        "IID",
        "iid:1",
        "shards:2",
        "",
    ],
)
def test_parse_bad(text: str) -> None:
    message = (
        f"bad partition {text!r}: use iid or dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.5"
    )
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        Partition.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(InvalidConfigError, match="bad partition"):
        Partition("dirichlet")
    with pytest.raises(InvalidConfigError, match="bad partition"):
        Partition("dirichlet", 0.0)
    with pytest.raises(InvalidConfigError, match="takes no alpha"):
        Partition("iid", 1.0)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "sorted, no duplicates"
    joined = np.concatenate(parts)
    assert len(joined) == n, "disjoint"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "dirichlet:5"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_disjoint_and_covering(spec: str, k: int) -> None:
    parts = partition_indices(LABELS, k, Partition.parse(spec), seed=3)
    assert len(parts) == k
    _check_cover(parts, len(LABELS))


def test_iid_is_even_and_mixed() -> None:
    parts = partition_indices(LABELS, 3, Partition("iid"), seed=0)
    assert sorted(len(p) for p in parts) == [333, 333, 334]
    for part in parts:
        # A shuffled split of 10 balanced classes: every class present, none dominant.
        counts = np.bincount(LABELS[part], minlength=10)
        assert counts.min() > 15 and counts.max() < 55


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_deterministic_per_seed(spec: str) -> None:
    partition = Partition.parse(spec)
    a = partition_indices(LABELS, 4, partition, seed=11)
    b = partition_indices(LABELS, 4, partition, seed=11)
    c = partition_indices(LABELS, 4, partition, seed=12)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _mean_skew(alpha: float, seeds: range) -> float:
    """Mean total-variation distance between each shard's label mix and the global one."""
    distances = []
    for seed in seeds:
        for part in partition_indices(LABELS, 5, Partition("dirichlet", alpha), seed=seed):
            mix = np.bincount(LABELS[part], minlength=10) / len(part)
            distances.append(0.5 * np.abs(mix - 0.1).sum())
    return float(np.mean(distances))


def test_small_alpha_skews_labels_more() -> None:
    skewed = _mean_skew(0.1, range(5))
    near_iid = _mean_skew(100.0, range(5))
    iid_parts = partition_indices(LABELS, 5, Partition("iid"), seed=0)
    iid = np.mean(
        [0.5 * np.abs(np.bincount(LABELS[p], minlength=10) / len(p) - 0.1).sum() for p in iid_parts]
    )
    # Dir(0.1) concentrates each class on about one shard: TV distance near 0.7;
    # Dir(100) barely differs from a shuffled split (about 0.05).
    assert skewed > 0.5
    assert near_iid < 0.12
    assert iid < 0.12
    assert skewed > 4 * near_iid


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1"])
def test_min_size_honoured(spec: str) -> None:
    for seed in range(5):
        parts = partition_indices(LABELS, 10, Partition.parse(spec), seed=seed, min_size=50)
        assert min(len(p) for p in parts) >= 50


def test_min_size_unreachable_raises_data_error() -> None:
    # Two classes, 30 samples, 3 shards of at least 10: only an almost exactly
    # even split works, which Dir(0.01) essentially never draws.
    labels = np.repeat([0, 1], 15)
    with pytest.raises(DataError, match=r"raise alpha .* or lower the number of hospitals"):
        partition_indices(labels, 3, Partition("dirichlet", 0.01), seed=0)


@pytest.mark.parametrize("k", [0, -1, 101])
def test_too_many_or_too_few_partitions(k: int) -> None:
    with pytest.raises(InvalidConfigError, match=r"use between 1 and 100 hospitals"):
        partition_indices(LABELS, k, Partition("iid"), seed=0)
    assert len(partition_indices(LABELS, 100, Partition("iid"), seed=0)) == 100


def test_bad_arguments() -> None:
    with pytest.raises(InvalidConfigError, match="1-D"):
        partition_indices(LABELS.reshape(10, 100), 2, Partition("iid"), seed=0)
    with pytest.raises(InvalidConfigError, match="min_size"):
        partition_indices(LABELS, 2, Partition("iid"), seed=0, min_size=0)
