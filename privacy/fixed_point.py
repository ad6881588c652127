"""Fixed-point encoding of weighted model values as exact integers.

Encrypted aggregation only adds, so a value needs no more than a fixed-point
integer: hospital k with sample weight ``w_k`` sends ``round(w_k * x * 2**F)``
and the sum of those integers is exact under BFV. The only error is rounding,
at most 1/2 unit per hospital, so the decrypted average of K hospitals is
within ``K / (2 W) * 2**-F <= 2**-(F + 1)`` of the exact weighted average
(``W = sum w_k >= K``): 7.6e-6 at the default ``F = 16``, far below the noise
DP-SGD adds to any round (``lr * sigma * C / B`` per step, ~1e-2 here).

Range: slots hold signed integers below ``2**slot_bits`` (45 bits by default).
Each hospital's values must stay below ``2**value_bound_bits`` in magnitude
(checked before encryption), so a sum stays exact while the total weight is
at most :func:`weight_capacity` ``= 2**(slot_bits - value_bound_bits - F)``
(2**21 ~ 2.1 M records by default); the coordinator checks that bound, from the
plaintext sample weights, before adding an update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedvault.errors import InvalidConfigError, MalformedUpdateError

__all__ = ["FixedPoint", "decode", "encode"]


@dataclass(frozen=True, kw_only=True)
class FixedPoint:
    """How values become integers: ``round(weight * x * 2**scale_bits)``.

    Parameters
    ----------
    scale_bits
        Fractional bits F; sets the precision (``2**-(F+1)`` worst case on the average).
    value_bound_bits
        Every value sent must satisfy ``|x| < 2**value_bound_bits``.
    slot_bits
        Signed integers below ``2**slot_bits`` decode exactly (from the HE parameters).
    """

    scale_bits: int = 16
    value_bound_bits: int = 8
    slot_bits: int = 45

    def __post_init__(self) -> None:
        for name in ("scale_bits", "value_bound_bits", "slot_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidConfigError(f"{name} must be a non-negative int, got {value!r}")
        if self.scale_bits + self.value_bound_bits >= self.slot_bits:
            raise InvalidConfigError(
                f"scale_bits={self.scale_bits} + value_bound_bits={self.value_bound_bits} leave "
                f"no room for sample weights in {self.slot_bits}-bit slots; lower one of them"
            )

    @property
    def value_bound(self) -> float:
        """Values sent must be strictly smaller than this in magnitude."""
        return float(2**self.value_bound_bits)

    @property
    def weight_capacity(self) -> float:
        """Largest total sample weight whose sum still decodes exactly."""
        return float(2 ** (self.slot_bits - self.value_bound_bits - self.scale_bits))

    @property
    def max_error(self) -> float:
        """Worst-case rounding error of a decrypted weighted average."""
        return float(2.0 ** -(self.scale_bits + 1))


def encode(vector: np.ndarray, *, weight: float, spec: FixedPoint) -> np.ndarray:
    """``round(weight * vector * 2**F)`` as int64 (``vector`` is overwritten).

    Raises
    ------
    MalformedUpdateError
        If a value reaches the bound or the weight alone exceeds the capacity.
    """
    if weight > spec.weight_capacity:
        raise MalformedUpdateError(
            f"sample weight {weight:g} exceeds the {spec.weight_capacity:g} records this "
            f"fixed-point encoding can sum at scale 2**-{spec.scale_bits}; lower scale_bits"
        )
    peak = float(np.max(np.abs(vector))) if vector.size else 0.0
    if not peak < spec.value_bound:  # also catches NaN and inf
        raise MalformedUpdateError(
            f"model values reach {peak:.3g}, beyond the ±{spec.value_bound:g} the encrypted "
            "encoding carries; training probably diverged (lower the learning rate), or "
            "raise value_bound_bits"
        )
    vector *= weight * 2.0**spec.scale_bits
    np.rint(vector, out=vector)
    return vector.astype(np.int64)


def decode(ints: np.ndarray, *, spec: FixedPoint) -> np.ndarray:
    """Integers back to float64 values (still multiplied by the weight)."""
    return np.ldexp(np.asarray(ints, dtype=np.float64), -spec.scale_bits)
