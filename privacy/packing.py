"""Pack a model's named tensors into one flat vector, and back.

BFV encrypts ``N`` values per ciphertext. Encrypting each layer
separately would waste most of the last ciphertext of every layer (a bias of
10 values costs a full ciphertext), so all tensors are laid end to end in one
float64 vector that is then cut into as few ciphertexts as possible. The
:class:`Layout` records how to undo that, and travels in the update envelope.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedvault.privacy.errors import MalformedUpdateError
from fedvault.proto import update_pb2

__all__ = ["FLOAT_DTYPES", "Layout", "TensorSpec", "flatten", "unflatten"]

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


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[Layout, np.ndarray]:
    """Pack named float tensors into one new float64 vector, in mapping order.

    Returns
    -------
    tuple[Layout, numpy.ndarray]
        The layout and a freshly allocated 1-D float64 vector (safe to modify).

    Raises
    ------
    MalformedUpdateError
        If a tensor is not floating point, or holds NaN or infinity (HE would
        encrypt them as garbage that poisons the whole aggregate).
    """
    specs: list[TensorSpec] = []
    values: list[np.ndarray] = []
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
        values.append(arr)
    layout = Layout(tensors=tuple(specs))

    vector = np.empty(layout.size, dtype=np.float64)
    offset = 0
    for spec, arr in zip(specs, values, strict=True):
        vector[offset : offset + spec.size] = arr.reshape(-1)
        offset += spec.size
    if not np.isfinite(vector).all():
        bad = _first_non_finite(layout, vector)
        raise MalformedUpdateError(
            f"tensor {bad!r} holds NaN or infinite values; refusing to encrypt it. "
            "Training diverged: lower the learning rate or check the data"
        )
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


def _first_non_finite(layout: Layout, vector: np.ndarray) -> str:
    """Name of the first tensor holding a non-finite value (only called on failure)."""
    offset = 0
    for spec in layout.tensors:
        if not np.isfinite(vector[offset : offset + spec.size]).all():
            return spec.name
        offset += spec.size
    return "<unknown>"
