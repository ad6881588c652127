"""Plaintext FedAvg (``secure_aggregation = "none"``).

Encrypted aggregation lives in :mod:`fedvault.privacy.he` (the coordinator only
adds ciphertexts); this module is the research baseline. It accumulates in
place, one update at a time, so memory stays at one model however many
hospitals reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedvault.privacy.errors import MalformedUpdateError

__all__ = ["PlainFedAvg"]


class PlainFedAvg:
    """Streaming sample-weighted average of named float arrays."""

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], *, weight: float) -> None:
        """Validate fully, then accumulate; a rejected update changes nothing."""
        if not (math.isfinite(weight) and weight > 0):
            raise MalformedUpdateError(f"sample weight must be finite and > 0 (got {weight})")
        if self._sum and list(arrays) != list(self._sum):
            raise MalformedUpdateError(
                "update layout differs from the other hospitals' (tensor names or order)"
            )
        for name, value in arrays.items():
            if value.dtype.kind != "f":
                raise MalformedUpdateError(f"tensor {name!r} is {value.dtype}, expected floats")
            if self._sum and value.shape != self._sum[name].shape:
                raise MalformedUpdateError(
                    f"tensor {name!r} has shape {value.shape}, expected {self._sum[name].shape}"
                )
            if not np.isfinite(value).all():
                raise MalformedUpdateError(f"tensor {name!r} holds NaN or Inf")
        for name, value in arrays.items():
            if name in self._sum:
                self._sum[name] += weight * value
            else:
                self._sum[name] = weight * value.astype(np.float64)
                self._dtypes[name] = value.dtype
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise MalformedUpdateError("no update to aggregate")
        return {k: (v / self.total_weight).astype(self._dtypes[k]) for k, v in self._sum.items()}
