"""Arrays in numpy's own file formats, read without pickle.

``.npz`` for named float arrays kept on disk or in a store; ``.npy`` as Flower
carries each array of a message.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedvault.errors import MalformedUpdateError

__all__ = ["array_from_npy", "arrays_from_bytes", "arrays_to_bytes"]


def arrays_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as ``.npz`` bytes (uncompressed)."""
    buf = io.BytesIO()
    np.savez(buf, **dict(arrays))  # type: ignore[arg-type]
    return buf.getvalue()


def arrays_from_bytes(blob: bytes) -> dict[str, np.ndarray]:
    """The named arrays of ``.npz`` bytes, loaded without pickle."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise MalformedUpdateError(f"stored plaintext model is unreadable: {exc}") from exc


def array_from_npy(data: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """The array of ``.npy`` bytes said to hold ``dtype`` and ``shape`` (as Flower's ``Array``).

    Exactly ``np.load(io.BytesIO(data), allow_pickle=False)``, and as fast as a
    copy when the bytes start with the very header ``np.save`` writes for a
    C-ordered array of that dtype and shape and hold nothing else. numpy parses
    a header with ``ast.literal_eval``, about half of decoding a small array and
    most of the coordinator's work per reply; a model's arrays repeat the same
    few headers every round, so each is written once by numpy and then compared.
    Anything else (another layout or version, a header that disagrees with
    ``dtype`` and ``shape``, trailing bytes) goes to ``np.load``, which parses and
    refuses as before: ``ValueError`` or ``EOFError``.
    """
    expected = _npy_header(dtype, tuple(shape))
    if expected is not None:
        header, kind, count = expected
        if len(data) == len(header) + count * kind.itemsize and data.startswith(header):
            flat = np.frombuffer(data, dtype=kind, count=count, offset=len(header))
            return flat.reshape(shape).copy()  # writable and owned, as np.load returns
    return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> tuple[bytes, np.dtype, int] | None:
    """The header ``np.save`` writes for a C-ordered ``dtype``/``shape`` array, its dtype, size."""
    try:
        kind = np.dtype(dtype)
        if kind.hasobject or not all(isinstance(n, int) and n >= 0 for n in shape):
            return None  # np.load refuses objects without pickle; let it say so
        buf = io.BytesIO()
        fields = {
            "descr": np.lib.format.dtype_to_descr(kind),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(buf, fields)  # np.save's choice below 64 KiB
    except (TypeError, ValueError):
        return None
    return buf.getvalue(), kind, math.prod(shape)
