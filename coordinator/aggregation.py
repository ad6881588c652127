"""Plaintext FedAvg (``secure_aggregation = "none"``).

Encrypted aggregation lives in :mod:`fedvault.privacy.he` (the coordinator only
adds ciphertexts); this module is the research baseline. It accumulates one
update at a time, so memory stays at two models (the running sum and a spare)
however many hospitals reply.

Each update costs one fused pass, ``spare = acc + w * x`` (torch's ``add`` with
``alpha``), then one sum of ``spare`` while it is still in cache: the sum is
finite exactly when the update holds no NaN or Inf *and* the weighted sum did
not overflow, so one check validates both, and a refused update never touches
``acc`` (the buffers swap only on success). That keeps the whole round within
2x of an unweighted in-place numpy sum (``bench/plain_agg.py``); checking the
update before adding it reads it from memory twice (~2.2x), and numpy's
multiply-then-add takes two passes and a temporary (~4x). The passes run on one
thread: memory-bound work gains little from a second one, and on a shared
machine OpenMP's spinning threads made them up to 10x slower.

Accumulation is in the tensors' own precision (float16 in float32): float32
keeps the relative error of the average below ``K * 2**-24`` for K updates
(6e-7 for 10), orders of magnitude under any round's DP noise, and halves the
memory traffic of a float64 accumulator. The average is a convex combination of
finite updates, so dividing the checked sum cannot overflow.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from fedvault.privacy.errors import MalformedUpdateError

__all__ = ["PlainFedAvg"]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on the calling thread only (restored after; affects speed only)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_tensor(value: np.ndarray) -> torch.Tensor:
    """A zero-copy, never-written view (Flower hands over read-only arrays)."""
    array = np.ascontiguousarray(value)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable": nothing writes to it
        return torch.from_numpy(array)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Exact: a sum is finite only if every term is; the full scan only if the sum overflows."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _why_not_finite(name: str, update: torch.Tensor) -> str:
    """The reason a weighted sum turned non-finite (only on refusal: a full scan)."""
    if not bool(torch.isfinite(update).all()):
        return f"tensor {name!r} holds NaN or Inf"
    return (
        f"tensor {name!r} overflowed the weighted sum; the update holds absurdly large "
        "values, check this hospital's training"
    )


class PlainFedAvg:
    """Streaming sample-weighted average of named float arrays."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._spare: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], *, weight: float) -> None:
        """Validate and accumulate; a refused update changes nothing."""
        if not (math.isfinite(weight) and weight > 0):
            raise MalformedUpdateError(f"sample weight must be finite and > 0 (got {weight})")
        if self._sum and list(arrays) != list(self._sum):
            raise MalformedUpdateError(
                "update layout differs from the other hospitals' (tensor names or order)"
            )
        for name, value in arrays.items():
            if value.dtype.kind != "f":
                raise MalformedUpdateError(f"tensor {name!r} is {value.dtype}, expected floats")
            if self._sum and value.shape != tuple(self._sum[name].shape):
                raise MalformedUpdateError(
                    f"tensor {name!r} has shape {value.shape}, expected "
                    f"{tuple(self._sum[name].shape)}"
                )
        with _one_thread():
            new: dict[str, torch.Tensor] = {}
            for name, value in arrays.items():
                tensor = _as_tensor(value)
                if self._sum:
                    acc = self._sum[name]
                    out = self._spare.get(name)
                    if out is None:
                        out = torch.empty_like(acc)
                    torch.add(acc, tensor.to(acc.dtype), alpha=weight, out=out)
                else:
                    dtype = torch.float32 if tensor.dtype == torch.float16 else tensor.dtype
                    out = tensor.to(dtype).mul(weight)
                if not _all_finite(out):
                    raise MalformedUpdateError(_why_not_finite(name, tensor))
                new[name] = out
        if self._sum:
            self._spare = self._sum  # the old sum's memory is the next update's output
        else:
            self._dtypes = {name: value.dtype for name, value in arrays.items()}
        self._sum = new
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The weighted average, in each tensor's original dtype.

        Raises
        ------
        MalformedUpdateError
            If no update was added.
        """
        if not self.count:
            raise MalformedUpdateError("no update to aggregate")
        out: dict[str, np.ndarray] = {}
        with _one_thread():
            for name, acc in self._sum.items():
                average = acc.div(self.total_weight).numpy()
                out[name] = average.astype(self._dtypes[name], copy=False)
        return out
