"""CKKS parameters and key contexts for encrypted aggregation.

fedvault only ever *adds* ciphertexts (FedAvg weighting is done in plaintext at
each hospital before encryption), so it needs no relinearization or Galois
keys and no rescaling. That keeps the public context a hospital hands to the
coordinator small (the public key only) and lets the whole coefficient
modulus serve as headroom for large sums.

References
----------
Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate
Numbers", ASIACRYPT 2017 (CKKS). Albrecht et al., "Homomorphic Encryption
Security Standard", HomomorphicEncryption.org, 2018 (the parameter table).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import tenseal as ts

from fedvault.privacy.errors import (
    InvalidConfigError,
    MalformedUpdateError,
    SecretKeyExposureError,
)

__all__ = [
    "HE_STANDARD_MAX_COEFF_BITS",
    "CkksContext",
    "CkksParams",
]

#: Largest total coefficient-modulus bit count per ring degree that keeps
#: 128-bit classical security (HomomorphicEncryption.org standard, Table 1,
#: ternary secret); SEAL enforces the same table.
HE_STANDARD_MAX_COEFF_BITS: Mapping[int, int] = MappingProxyType(
    {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
)

_MIN_PRIME_BITS = 20
_MAX_PRIME_BITS = 60

# Errors the TenSEAL/SEAL bindings raise on malformed input.
_TS_ERRORS = (ValueError, RuntimeError, TypeError, OverflowError, MemoryError)


@dataclass(frozen=True, kw_only=True)
class CkksParams:
    """CKKS encryption parameters, validated against 128-bit security.

    Parameters
    ----------
    poly_modulus_degree
        Ring degree N; a vector of N/2 values fits in one ciphertext.
        8192 is the smallest degree whose security budget (218 bits) leaves
        room for a modulus wide enough for large weighted sums.
    coeff_mod_bit_sizes
        Bit sizes of the primes of the coefficient modulus. The last one is
        SEAL's "special" prime, used only for key switching, so it must be at
        least as large as any data prime. Because aggregation only adds, no
        prime is ever consumed by rescaling: the default ``(60, 40, 60)``
        gives a 100-bit data modulus, i.e. sums up to ``2**59`` in absolute
        value decode correctly at the ``2**40`` scale, while the whole modulus
        (160 bits) stays well inside the 218-bit budget of N = 8192.
    global_scale_bits
        log2 of the CKKS scale: values are encoded as round(x * 2**bits), so
        this sets the absolute precision (about 1e-8 at 40 bits).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    global_scale_bits: int = 40

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if isinstance(degree, bool) or not isinstance(degree, int):
            raise InvalidConfigError(
                f"poly_modulus_degree must be an int, got {degree!r}; "
                f"use one of {sorted(HE_STANDARD_MAX_COEFF_BITS)}"
            )
        if degree not in HE_STANDARD_MAX_COEFF_BITS:
            raise InvalidConfigError(
                f"poly_modulus_degree={degree} is not a power of two in "
                f"{sorted(HE_STANDARD_MAX_COEFF_BITS)}; pick one of those (8192 is the default)"
            )
        try:
            bits = tuple(self.coeff_mod_bit_sizes)
        except TypeError:
            raise InvalidConfigError(
                f"coeff_mod_bit_sizes must be a sequence of ints, got {self.coeff_mod_bit_sizes!r}"
            ) from None
        if any(isinstance(b, bool) or not isinstance(b, int) for b in bits):
            raise InvalidConfigError(f"coeff_mod_bit_sizes must hold ints, got {bits!r}")
        # Normalise a list to a tuple so the dataclass stays hashable.
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if len(bits) < 2:
            raise InvalidConfigError(
                f"coeff_mod_bit_sizes={bits!r} needs at least 2 primes "
                "(one data prime plus the special key-switching prime), e.g. (60, 40, 60)"
            )
        for b in bits:
            if not _MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS:
                raise InvalidConfigError(
                    f"coeff_mod_bit_sizes={bits!r} has a {b}-bit prime; each prime must be "
                    f"{_MIN_PRIME_BITS} to {_MAX_PRIME_BITS} bits"
                )
        limit = HE_STANDARD_MAX_COEFF_BITS[degree]
        if sum(bits) > limit:
            raise InvalidConfigError(
                f"coeff_mod_bit_sizes={bits!r} totals {sum(bits)} bits, more than the "
                f"{limit} bits poly_modulus_degree={degree} allows at 128-bit security "
                "(HomomorphicEncryption.org standard); use fewer/smaller primes or a larger "
                "poly_modulus_degree"
            )
        scale = self.global_scale_bits
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise InvalidConfigError(
                f"global_scale_bits must be a positive int, got {scale!r} (40 is the default)"
            )
        if scale >= bits[0] or scale > _MAX_PRIME_BITS:
            raise InvalidConfigError(
                f"global_scale_bits={scale} must be smaller than the first prime "
                f"({bits[0]} bits) and at most {_MAX_PRIME_BITS}, or decoding loses "
                "the integer part; lower global_scale_bits"
            )

    @property
    def slots(self) -> int:
        """Number of real values one ciphertext holds (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus fresh ciphertexts live under (all but the special prime)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_abs_value(self) -> float:
        """Largest absolute (summed) value that still decodes correctly.

        A value ``x`` is encoded as ``x * 2**global_scale_bits`` and must stay
        below half the data modulus; beyond that the sum wraps around silently.
        """
        return float(2 ** (self.data_modulus_bits - self.global_scale_bits - 1))


def _params_of(context: ts.Context) -> CkksParams:
    """Read the parameters back out of a TenSEAL context (validating them)."""
    import tenseal.sealapi  # noqa: F401  (registers the seal::Modulus binding)

    parms = context.seal_context().data.key_context_data().parms()
    if parms.scheme().name != "CKKS":
        raise MalformedUpdateError(
            f"the serialized context uses the {parms.scheme().name} scheme, not CKKS; "
            "use the CKKS context from the consortium's key ceremony"
        )
    scale = context.global_scale
    scale_bits = round(math.log2(scale)) if scale > 0 else 0
    if scale <= 0 or 2.0**scale_bits != scale:
        raise MalformedUpdateError(
            f"the serialized context's global scale {scale!r} is not a power of two; "
            "regenerate the context with CkksContext.generate"
        )
    try:
        return CkksParams(
            poly_modulus_degree=int(parms.poly_modulus_degree()),
            coeff_mod_bit_sizes=tuple(int(m.bit_count()) for m in parms.coeff_modulus()),
            global_scale_bits=scale_bits,
        )
    except InvalidConfigError as exc:
        raise MalformedUpdateError(
            f"the serialized context has parameters fedvault refuses: {exc}"
        ) from exc


class CkksContext:
    """Wraps a :class:`tenseal.Context`: secret (hospitals) or public (coordinator).

    Build one with :meth:`generate` (a new key pair, at a hospital) or
    :meth:`from_bytes`. Anything that leaves a hospital goes through
    :meth:`serialize_public`, which never writes the secret key.
    """

    def __init__(self, context: ts.Context, params: CkksParams) -> None:
        """Wrap an existing TenSEAL context; prefer :meth:`generate` / :meth:`from_bytes`."""
        self._context = context
        self._params = params

    @classmethod
    def generate(cls, params: CkksParams | None = None) -> CkksContext:
        """Generate a fresh secret context (new key pair).

        Only the public and secret keys are used: SEAL creates relinearization
        keys with every context, but they are never serialized, and Galois
        keys (rotations) are never generated, since aggregation only adds.
        """
        params = CkksParams() if params is None else params
        try:
            context = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            )
        except _TS_ERRORS as exc:
            raise InvalidConfigError(
                f"SEAL refused CKKS parameters {params!r}: {exc}; "
                "try the defaults (8192, (60, 40, 60), 40)"
            ) from exc
        context.global_scale = float(2**params.global_scale_bits)
        return cls(context, params)

    @classmethod
    def from_bytes(cls, data: bytes) -> CkksContext:
        """Load a context written by :meth:`serialize_public` or :meth:`serialize_secret`.

        Raises
        ------
        MalformedUpdateError
            If ``data`` is not a serialized CKKS context with a public key and
            parameters that pass :class:`CkksParams` validation.
        """
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise MalformedUpdateError(
                "the serialized CKKS context is empty or not bytes; "
                "re-export it with CkksContext.serialize_public()"
            )
        try:
            context = ts.context_from(bytes(data))
        except _TS_ERRORS as exc:
            raise MalformedUpdateError(
                f"cannot parse the serialized CKKS context ({exc}); the file is corrupt "
                "or truncated: copy the context from the kit again"
            ) from exc
        params = _params_of(context)
        try:
            has_public_key = bool(context.has_public_key())
        except ValueError:  # TenSEAL raises for symmetric-encryption contexts
            has_public_key = False
        if not has_public_key:
            raise MalformedUpdateError(
                "the serialized CKKS context holds no public key, so nobody could encrypt "
                "under it; re-export it with CkksContext.serialize_public()"
            )
        return cls(context, params)

    @property
    def is_private(self) -> bool:
        """Whether this context holds the secret key (can decrypt)."""
        return bool(self._context.is_private())

    @property
    def params(self) -> CkksParams:
        """The validated CKKS parameters."""
        return self._params

    @property
    def tenseal(self) -> ts.Context:
        """The wrapped TenSEAL context (do not change its scale or keys)."""
        return self._context

    @cached_property
    def _public_bytes(self) -> bytes:
        return bytes(
            self._context.serialize(
                save_public_key=True,
                save_secret_key=False,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )

    @cached_property
    def fingerprint(self) -> str:
        """Hex SHA-256 of the public serialization (parameters + public key).

        Identical for a secret context and its public copy, so the
        coordinator and every hospital can check they share one key pair
        without ever handling the secret key. Computed once.
        """
        return hashlib.sha256(self._public_bytes).hexdigest()

    def public(self) -> CkksContext:
        """A copy of this context without the secret key."""
        return CkksContext.from_bytes(self._public_bytes)

    def serialize_public(self) -> bytes:
        """Serialize parameters and the public key; never the secret key."""
        return self._public_bytes

    def serialize_secret(self) -> bytes:
        """Serialize *with* the secret key, for the hospital's own disk or key sealing.

        Raises
        ------
        SecretKeyExposureError
            If this context holds no secret key.
        """
        if not self.is_private:
            raise SecretKeyExposureError(
                "this context holds no secret key, so there is nothing secret to serialize; "
                "use serialize_public(), or load the hospital's secret context"
            )
        return bytes(
            self._context.serialize(
                save_public_key=True,
                save_secret_key=True,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )

    def __repr__(self) -> str:
        kind = "secret" if self.is_private else "public"
        return f"CkksContext({kind}, {self._params!r}, fingerprint={self.fingerprint[:16]}…)"
