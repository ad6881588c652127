"""Pack a model's named tensors into one flat vector, and back.

BFV encrypts ``N`` values per ciphertext. Encrypting each layer
separately would waste most of the last ciphertext of every layer (a bias of
10 values costs a full ciphertext), so all tensors are laid end to end in one
float64 vector that is then cut into as few ciphertexts as possible. The
:class:`Layout` records how to undo that, and travels in the update envelope.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedvault.errors import MalformedUpdateError
from fedvault.proto import update_pb2

__all__ = [
    "FLOAT_DTYPES",
    "Layout",
    "Scatter",
    "TensorSpec",
    "flatten",
    "iter_slices",
    "layout_of",
    "unflatten",
]

#: dtypes a tensor may have: the floating types NumPy and the wire agree on.
FLOAT_DTYPES: frozenset[str] = frozenset({"float16", "float32", "float64"})


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and original dtype of one packed tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of scalars in the tensor (1 for a scalar, shape ``()``)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """The ordered tensors packed into one flat vector."""

    tensors: tuple[TensorSpec, ...]

    @property
    def size(self) -> int:
        """Total number of scalars, i.e. the length of the flat vector."""
        return sum(t.size for t in self.tensors)

    def to_proto(self) -> update_pb2.Layout:
        """The wire form of this layout."""
        return update_pb2.Layout(
            tensors=[
                update_pb2.TensorSpec(name=t.name, shape=list(t.shape), dtype=t.dtype)
                for t in self.tensors
            ]
        )

    @classmethod
    def from_proto(cls, pb: update_pb2.Layout) -> Layout:
        """Read and validate a layout that came over the wire.

        Raises
        ------
        MalformedUpdateError
            On a negative dimension, an unknown dtype, or an empty or
            repeated tensor name.
        """
        seen: set[str] = set()
        tensors = []
        for t in pb.tensors:
            if not t.name:
                raise MalformedUpdateError(
                    "the update's layout has a tensor without a name; the sender must "
                    "pack a mapping of named tensors"
                )
            if t.name in seen:
                raise MalformedUpdateError(
                    f"the update's layout names tensor {t.name!r} twice; the sender's "
                    "packing is corrupt, discard this update"
                )
            seen.add(t.name)
            shape = tuple(int(d) for d in t.shape)
            if any(d < 0 for d in shape):
                raise MalformedUpdateError(
                    f"tensor {t.name!r} in the update's layout has a negative dimension "
                    f"{shape}; discard this update"
                )
            if t.dtype not in FLOAT_DTYPES:
                raise MalformedUpdateError(
                    f"tensor {t.name!r} in the update's layout has dtype {t.dtype!r}; "
                    f"only {sorted(FLOAT_DTYPES)} are allowed"
                )
            tensors.append(TensorSpec(name=t.name, shape=shape, dtype=t.dtype))
        return cls(tensors=tuple(tensors))


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout of named float tensors, in mapping order, checked for encryption.

    Raises
    ------
    MalformedUpdateError
        If a name is empty, a tensor is not floating point, or holds NaN or
        infinity (HE would encrypt them as garbage that poisons the whole aggregate).
    """
    specs: list[TensorSpec] = []
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise MalformedUpdateError(
                f"tensor names must be non-empty strings, got {name!r}; key the model's "
                "tensors by their state-dict names"
            )
        arr = np.asarray(value)
        if arr.dtype.name not in FLOAT_DTYPES:
            raise MalformedUpdateError(
                f"tensor {name!r} has dtype {arr.dtype}; only {sorted(FLOAT_DTYPES)} can "
                "be encrypted: cast integer buffers (e.g. batch-norm counters) to float "
                "or leave them out of the update"
            )
        specs.append(TensorSpec(name=name, shape=tuple(arr.shape), dtype=arr.dtype.name))
    for name, value in arrays.items():  # after the dtype checks: isfinite needs floats
        if not np.isfinite(np.asarray(value)).all():
            raise MalformedUpdateError(
                f"tensor {name!r} holds NaN or infinite values; refusing to encrypt it. "
                "Training diverged: lower the learning rate or check the data"
            )
    return Layout(tensors=tuple(specs))


def iter_slices(arrays: Mapping[str, np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The tensors' values in layout order, ``size`` at a time, as fresh float64 vectors.

    What :func:`flatten` would return, cut in pieces, without ever holding it
    whole: a hospital encrypting a large model holds one piece at a time.
    """
    piece = np.empty(size, dtype=np.float64)
    filled = 0
    for value in arrays.values():
        flat = np.asarray(value).reshape(-1)
        offset = 0
        while offset < flat.size:
            take = min(size - filled, flat.size - offset)
            piece[filled : filled + take] = flat[offset : offset + take]
            filled += take
            offset += take
            if filled == size:
                yield piece
                piece, filled = np.empty(size, dtype=np.float64), 0
    if filled:
        yield piece[:filled]


class Scatter:
    """Writes consecutive values into freshly allocated tensors of a layout.

    The inverse of :func:`iter_slices`: a hospital decrypting a large model
    writes each chunk's values straight into the output tensors (in ``dtype``,
    or each tensor's own), never holding a flat copy of the whole model.
    """

    def __init__(self, layout: Layout, dtype: str | None = None) -> None:
        self.out = {t.name: np.empty(t.size, dtype=dtype or t.dtype) for t in layout.tensors}
        self._shapes = {t.name: t.shape for t in layout.tensors}
        self._pending = [(t.name, t.size) for t in layout.tensors]
        self._index, self._offset = 0, 0

    def write(self, values: np.ndarray) -> None:
        """Append ``values`` (any extra beyond the layout's size is ignored: padding)."""
        start = 0
        while start < values.size and self._index < len(self._pending):
            name, size = self._pending[self._index]
            take = min(size - self._offset, values.size - start)
            self.out[name][self._offset : self._offset + take] = values[start : start + take]
            start += take
            self._offset += take
            if self._offset == size:
                self._index, self._offset = self._index + 1, 0

    def result(self) -> dict[str, np.ndarray]:
        """The tensors, reshaped; every value must have been written."""
        if self._index != len(self._pending):
            raise MalformedUpdateError("the update holds fewer values than its layout; discard it")
        return {name: a.reshape(self._shapes[name]) for name, a in self.out.items()}


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[Layout, np.ndarray]:
    """Pack named float tensors into one new float64 vector, in mapping order.

    Returns
    -------
    tuple[Layout, numpy.ndarray]
        The layout and a freshly allocated 1-D float64 vector (safe to modify).

    Raises
    ------
    MalformedUpdateError
        As :func:`layout_of`.
    """
    layout = layout_of(arrays)
    vector = np.empty(layout.size, dtype=np.float64)
    offset = 0
    for spec, arr in zip(layout.tensors, arrays.values(), strict=True):
        vector[offset : offset + spec.size] = np.asarray(arr).reshape(-1)
        offset += spec.size
    return layout, vector


def unflatten(layout: Layout, vector: np.ndarray) -> dict[str, np.ndarray]:
    """Split a flat vector back into named tensors of the layout's shapes and dtypes.

    Raises
    ------
    MalformedUpdateError
        If ``vector`` is not 1-D of exactly ``layout.size`` values.
    """
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.shape[0] != layout.size:
        raise MalformedUpdateError(
            f"vector of shape {vector.shape} does not match the layout's "
            f"{layout.size} values; the update and its layout disagree, discard it"
        )
    out: dict[str, np.ndarray] = {}
    offset = 0
    for spec in layout.tensors:
        piece = vector[offset : offset + spec.size]
        out[spec.name] = piece.reshape(spec.shape).astype(spec.dtype, copy=True)
        offset += spec.size
    return out
