"""The coordinator's one seam for aggregation, and plaintext FedAvg.

Both aggregators implement :class:`UpdateAggregator` (add an update with its
weight; the result, the count and the total weight): :class:`PlainFedAvg` here
(``secure_aggregation = "none"``, the research baseline) and the encrypted
:class:`fedvault.privacy.he.Aggregator` (the coordinator only adds
ciphertexts). Everything else the job's mode decides on the coordinator (the
payload an update must be, its layout, the aggregator, how the result and the
initial model travel) is an :class:`AggregationMode`, and
:func:`aggregation_mode` is the one place that picks it.

:class:`PlainFedAvg` accumulates one update at a time, so memory stays at two
models (the running sum and a spare) however many hospitals reply.

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
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from fedvault.config import SecureAggregation
from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.messages import ModelPayload
from fedvault.privacy.he import Aggregator, encrypt_update, parse_envelope
from fedvault.privacy.he_context import HeContext
from fedvault.proto import update_pb2

__all__ = [
    "AggregationMode",
    "ModelLayout",
    "ParsedUpdate",
    "PlainFedAvg",
    "ShapedArray",
    "UpdateAggregator",
    "aggregation_mode",
]

UpdateT = TypeVar("UpdateT", contravariant=True)
ResultT = TypeVar("ResultT", covariant=True)
U = TypeVar("U")
R = TypeVar("R")


class ShapedArray(Protocol):
    """What a layout reads of an array: numpy's, or Flower's :class:`~flwr.app.Array`."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's dimensions."""
        ...

    @property
    def dtype(self) -> object:
        """The array's element type (its ``str`` is the name the layout records)."""
        ...


@runtime_checkable
class UpdateAggregator(Protocol[UpdateT, ResultT]):
    """A running, sample-weighted aggregate of one round's updates.

    ``add`` validates an update and folds it in (a refused update raises
    :class:`~fedvault.errors.FedvaultError` and changes nothing);
    ``result`` is the aggregate so far; ``count`` and ``total_weight`` are the
    updates added and the sum of their weights.
    """

    @property
    def count(self) -> int:
        """The number of updates added."""
        ...

    @property
    def total_weight(self) -> float:
        """The sum of the added updates' weights."""
        ...

    def add(self, update: UpdateT, /, *, weight: float) -> None:
        """Validate ``update`` and fold it in with ``weight``; a refused one changes nothing."""
        ...

    def result(self) -> ResultT:
        """The aggregate so far."""
        ...


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


# --- layouts ---------------------------------------------------------------------

_Spec = tuple[str, tuple[int, ...], str]  # name, shape, dtype


@dataclass(frozen=True)
class ModelLayout:
    """Names, shapes and dtypes of a model's tensors, in packing order.

    For an envelope also its fixed-point encoding (scale and bound bits):
    summands encoded differently add up to garbage.
    """

    tensors: tuple[_Spec, ...]
    encoding: tuple[int, int] | None = None

    @classmethod
    def of_envelope(cls, env: update_pb2.UpdateEnvelope) -> ModelLayout:
        """Of an encrypted update's envelope, with its fixed-point encoding."""
        return cls(
            tuple((t.name, tuple(int(d) for d in t.shape), t.dtype) for t in env.layout.tensors),
            (env.scale_bits, env.value_bound_bits),
        )

    @classmethod
    def of_arrays(cls, arrays: Mapping[str, ShapedArray]) -> ModelLayout:
        """Of named arrays (numpy's, or Flower's :class:`~flwr.app.Array`)."""
        return cls(tuple((k, tuple(v.shape), str(v.dtype)) for k, v in arrays.items()))

    def check(self, got: ModelLayout) -> None:
        """Raise :class:`MalformedUpdateError` naming the first difference of ``got``."""
        if got == self:
            return
        if got.tensors == self.tensors:
            raise MalformedUpdateError(
                f"update's fixed-point encoding (scale bits, bound bits) = {got.encoding} "
                f"differs from the model sent this round, {self.encoding}; run the same "
                "fedvault version and settings at every site, discard this update"
            )
        for i, (g, w) in enumerate(zip(got.tensors, self.tensors, strict=False)):
            if g != w:
                diff = f"tensor {i} is {g[0]!r} {g[1]} {g[2]}, expected {w[0]!r} {w[1]} {w[2]}"
                break
        else:
            diff = f"{len(got.tensors)} tensors, expected {len(self.tensors)}"
        raise MalformedUpdateError(
            f"update's layout differs from the model sent this round: {diff}; the hospital "
            "runs another model version, discard this update"
        )


# --- the job's mode ---------------------------------------------------------------


@dataclass(frozen=True)
class ParsedUpdate(Generic[U]):
    """An update in the form its aggregator adds, with what is checked before.

    ``weight`` is the weight the update carries itself (an envelope's
    ``sample_weight``); ``None`` when only the reply states it (plaintext).
    """

    data: U
    layout: ModelLayout
    weight: float | None = None


def _check_encrypted(payload: ModelPayload) -> bytes:
    """An encrypted job's update is an envelope."""
    if payload.envelope is None:
        raise MalformedUpdateError(
            "plaintext update in an encrypted job; discard it and check the "
            "hospital's configuration (it must encrypt its updates)"
        )
    return payload.envelope


def _check_plaintext(payload: ModelPayload) -> Mapping[str, np.ndarray]:
    """A plaintext job's update is named arrays."""
    if payload.arrays is None:
        raise MalformedUpdateError(
            "encrypted update in a plaintext job; discard it and check the hospital's configuration"
        )
    return payload.arrays


def _require_public(public_context: HeContext | None) -> HeContext:
    """An encrypted job's coordinator holds the public HE context, and only that."""
    if public_context is None:
        raise InvalidConfigError("he mode needs the consortium's public HE context")
    if public_context.is_private:
        # The coordinator must be *unable* to decrypt, not merely unwilling.
        raise InvalidConfigError(
            "the coordinator was given a HE context holding a secret key; "
            "give it only the public context"
        )
    return public_context


class AggregationMode(ABC, Generic[U, R]):
    """What the job's secure-aggregation mode decides on the coordinator.

    ``U`` is an update as its aggregator adds it, ``R`` the aggregate.
    """

    #: Whether models and updates travel encrypted.
    encrypted: bool

    def check_context(self, public_context: HeContext | None) -> None:
        """Refuse an HE context the mode cannot work with (or must not hold)."""

    @abstractmethod
    def aggregator(
        self, public_context: HeContext | None, *, key_epoch: int, job: str, server_round: int
    ) -> UpdateAggregator[U, R]:
        """A fresh aggregator for one round."""

    @abstractmethod
    def parse(self, payload: ModelPayload) -> ParsedUpdate[U]:
        """A hospital's update, if it is the kind of payload this mode sends."""

    @abstractmethod
    def payload(self, result: R) -> ModelPayload:
        """The round's aggregate as the model sent to hospitals."""

    @abstractmethod
    def initial_model(
        self,
        weights: Mapping[str, np.ndarray],
        public_context: HeContext | None,
        *,
        key_epoch: int,
        job: str,
    ) -> ModelPayload:
        """The initial model as it is sent to hospitals."""


class _Encrypted(AggregationMode[update_pb2.UpdateEnvelope, bytes]):
    """``he``: envelopes of BFV ciphertexts, summed without a secret key."""

    encrypted = True

    def check_context(self, public_context: HeContext | None) -> None:
        _require_public(public_context)

    def aggregator(
        self, public_context: HeContext | None, *, key_epoch: int, job: str, server_round: int
    ) -> Aggregator:
        return Aggregator(
            _require_public(public_context),
            key_epoch=key_epoch,
            job=job,
            server_round=server_round,
        )

    def parse(self, payload: ModelPayload) -> ParsedUpdate[update_pb2.UpdateEnvelope]:
        env = parse_envelope(_check_encrypted(payload))
        return ParsedUpdate(env, ModelLayout.of_envelope(env), env.sample_weight)

    def payload(self, result: bytes) -> ModelPayload:
        return ModelPayload(envelope=result)

    def initial_model(
        self,
        weights: Mapping[str, np.ndarray],
        public_context: HeContext | None,
        *,
        key_epoch: int,
        job: str,
    ) -> ModelPayload:
        envelope = encrypt_update(
            _require_public(public_context),
            weights,
            weight=1.0,
            key_epoch=key_epoch,
            job=job,
            server_round=0,
        )
        return ModelPayload(envelope=envelope)


class _Plain(AggregationMode[Mapping[str, np.ndarray], dict[str, np.ndarray]]):
    """``none``: plaintext arrays, averaged in the clear (research baselines)."""

    encrypted = False

    def aggregator(
        self, public_context: HeContext | None, *, key_epoch: int, job: str, server_round: int
    ) -> PlainFedAvg:
        return PlainFedAvg()

    def parse(self, payload: ModelPayload) -> ParsedUpdate[Mapping[str, np.ndarray]]:
        arrays = _check_plaintext(payload)
        return ParsedUpdate(arrays, ModelLayout.of_arrays(arrays))

    def payload(self, result: dict[str, np.ndarray]) -> ModelPayload:
        return ModelPayload(arrays=result)

    def initial_model(
        self,
        weights: Mapping[str, np.ndarray],
        public_context: HeContext | None,
        *,
        key_epoch: int,
        job: str,
    ) -> ModelPayload:
        return ModelPayload(arrays=weights)


_ENCRYPTED, _PLAIN = _Encrypted(), _Plain()


def aggregation_mode(mode: SecureAggregation) -> AggregationMode[Any, Any]:
    """The coordinator's behaviour for a job's ``secure_aggregation``.

    The one place on the coordinator that tells ``he`` from ``none``.
    """
    return _ENCRYPTED if mode.encrypted else _PLAIN
