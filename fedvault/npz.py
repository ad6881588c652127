"""Named float arrays as bytes: ``.npz`` without pickle, safe to load from disk or a store."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from fedvault.errors import MalformedUpdateError

__all__ = ["arrays_from_bytes", "arrays_to_bytes"]


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
