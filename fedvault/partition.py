"""Split one data set into per-hospital shards, for simulations.

Real hospitals hold their own records; a simulation has one data set and must
invent the consortium. Two schemes are offered:

* ``iid``: a shuffled, even split. Every hospital sees the same label mix, the
  easy case FedAvg was designed for.
* ``dirichlet:ALPHA``: label skew. For each class, the share each hospital gets
  is drawn from ``Dir(ALPHA, ..., ALPHA)`` (Yurochkin et al., "Bayesian
  Nonparametric Federated Learning of Neural Networks", ICML 2019; Hsu et al.,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification", 2019). Small ALPHA (0.1) gives hospitals dominated by one or
  two classes; large ALPHA (100) approaches iid.

This module is a leaf: numpy only, so the job configuration can parse
``--partition`` without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedvault.errors import DataError, InvalidConfigError

__all__ = ["Partition", "partition_indices"]

#: How many Dirichlet draws to try before giving up on ``min_size``.
_MAX_DIRICHLET_TRIES = 1000


def _bad_partition(text: str) -> InvalidConfigError:
    return InvalidConfigError(
        f"bad partition {text!r}: use iid or dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.5"
    )


@dataclass(frozen=True)
class Partition:
    """How a simulation splits its data set among hospitals.

    Parameters
    ----------
    kind
        ``"iid"`` (shuffled even split) or ``"dirichlet"`` (label skew).
    alpha
        Concentration of the Dirichlet prior; required, finite and > 0 for
        ``"dirichlet"``, and must be ``None`` for ``"iid"``.
    """

    kind: Literal["iid", "dirichlet"]
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "iid":
            if self.alpha is not None:
                raise InvalidConfigError(
                    f"partition 'iid' takes no alpha (got {self.alpha!r}): "
                    "drop alpha, or use kind='dirichlet'"
                )
        elif self.kind == "dirichlet":
            if self.alpha is None or not math.isfinite(self.alpha) or self.alpha <= 0:
                raise _bad_partition(f"dirichlet:{self.alpha}")
        else:
            raise _bad_partition(str(self.kind))

    @classmethod
    def parse(cls, text: str) -> Partition:
        """Read ``"iid"`` or ``"dirichlet:ALPHA"`` (the ``--partition`` syntax).

        Raises
        ------
        InvalidConfigError
            If the text is neither form, or ALPHA is not a finite number > 0.
        """
        spec = text.strip()
        if spec == "iid":
            return cls("iid")
        kind, sep, value = spec.partition(":")
        if kind != "dirichlet" or not sep:
            raise _bad_partition(text)
        try:
            alpha = float(value)
        except ValueError:
            raise _bad_partition(text) from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise _bad_partition(text)
        return cls("dirichlet", alpha)

    def __str__(self) -> str:
        # repr(float) is the shortest string that parses back to the same float.
        return "iid" if self.kind == "iid" else f"dirichlet:{self.alpha!r}"


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partition: Partition,
    *,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split the indices of a labelled data set into ``num_partitions`` shards.

    Parameters
    ----------
    labels
        One integer label per sample (1-D). Only the Dirichlet scheme reads the
        values; both use the length.
    num_partitions
        Number of hospitals, ``1 <= num_partitions <= len(labels) // min_size``.
    partition
        The scheme, see :class:`Partition`.
    seed
        Seeds ``np.random.default_rng``: the same seed gives the same shards,
        so a simulation is reproducible.
    min_size
        The fewest samples a shard may hold. DP-SGD on a handful of records
        spends its budget on noise alone, so tiny shards are refused rather
        than trained on.

    Returns
    -------
    list of numpy.ndarray
        Sorted ``int64`` index arrays, pairwise disjoint, covering
        ``range(len(labels))``.

    Raises
    ------
    InvalidConfigError
        If ``num_partitions`` or ``min_size`` is out of range.
    DataError
        If no Dirichlet draw in a bounded number of tries gives every shard
        ``min_size`` samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InvalidConfigError(
            f"labels must be 1-D (one label per sample), got shape {labels.shape}: "
            "pass the label column, not the features"
        )
    if min_size < 1:
        raise InvalidConfigError(f"min_size must be >= 1, got {min_size}")
    n = len(labels)
    most = n // min_size
    if not 1 <= num_partitions <= most:
        raise InvalidConfigError(
            f"cannot split {n} samples into {num_partitions} hospitals of at least "
            f"{min_size} samples each: use between 1 and {most} hospitals"
        )
    rng = np.random.default_rng(seed)
    if partition.kind == "iid":
        shards = np.array_split(rng.permutation(n), num_partitions)
        return [np.sort(s).astype(np.int64) for s in shards]
    if partition.alpha is None:  # excluded by Partition.__post_init__; narrows for mypy
        raise _bad_partition(str(partition))
    return _dirichlet(labels, num_partitions, partition.alpha, rng, min_size)


def _dirichlet(
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int,
) -> list[np.ndarray]:
    """Label-skewed split, redrawn until every shard has ``min_size`` samples.

    Per class, proportions ``p ~ Dir(alpha)`` decide each shard's share; a shard
    already holding its fair share ``n / num_partitions`` gets no more of later
    classes (the balancing step of Yurochkin et al.'s reference code), which
    keeps shard sizes comparable without hiding the label skew.
    """
    n = len(labels)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(_MAX_DIRICHLET_TRIES):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        sizes = np.zeros(num_partitions, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_partitions, alpha))
            p = p * (sizes < n / num_partitions)
            total = p.sum()
            # Every shard full (only possible on the last classes): share evenly.
            p = p / total if total > 0 else np.full(num_partitions, 1.0 / num_partitions)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for j, part in enumerate(np.split(idx, cuts)):
                shards[j].append(part)
                sizes[j] += len(part)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(s)).astype(np.int64) for s in shards]
    raise DataError(
        f"no dirichlet:{alpha!r} split of {n} samples into {num_partitions} hospitals "
        f"gave every hospital at least {min_size} samples after {_MAX_DIRICHLET_TRIES} "
        "tries: raise alpha (less label skew) or lower the number of hospitals"
    )
