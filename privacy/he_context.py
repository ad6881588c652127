"""Homomorphic-encryption parameters and key contexts (BFV via TenSEAL/SEAL).

fedvault only ever *adds* encrypted updates, so the scheme needs exact integer
addition and nothing else: no multiplication, no rescaling, no rotations.
Updates are therefore fixed-point integers (:mod:`fedvault.privacy.fixed_point`)
in BFV's batched slots rather than approximate reals in CKKS slots. BFV packs
N integers per ciphertext where CKKS packs N/2 reals, its sums are exact, and
both rest on the same RLWE problem with the same parameter table.

The coefficient modulus is one 60-bit prime for data plus a 49-bit special
prime that exists only because TenSEAL always creates relinearization keys
(it never travels and is never used): 109 bits, the HomomorphicEncryption.org
standard's bound for 128-bit classical security at N = 4096. One data prime is
the shortest chain a sum-only protocol needs; every extra prime would cost a
full copy of each ciphertext on the wire.

References
----------
Fan, Vercauteren, "Somewhat Practical Fully Homomorphic Encryption", 2012
(BFV). Albrecht et al., "Homomorphic Encryption Security Standard",
HomomorphicEncryption.org, 2018 (the parameter table). Microsoft SEAL 4.x
(the implementation TenSEAL wraps; it enforces the same table).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import cast

import tenseal as ts
import tenseal.sealapi as sealapi

from fedvault.errors import (
    InvalidConfigError,
    MalformedUpdateError,
    SecretKeyExposureError,
)
from fedvault.privacy import seal_bytes

__all__ = [
    "HE_STANDARD_MAX_COEFF_BITS",
    "TENSEAL_ERRORS",
    "HeContext",
    "HeParams",
]

#: Largest total coefficient-modulus bit count per ring degree that keeps
#: 128-bit classical security (HomomorphicEncryption.org standard, Table 1,
#: ternary secret); SEAL enforces the same table.
HE_STANDARD_MAX_COEFF_BITS: Mapping[int, int] = MappingProxyType(
    {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
)

_MIN_PRIME_BITS = 20
_MAX_PRIME_BITS = 60
# Decryption is exact while the accumulated noise stays below q / (2t); keep at
# least this many bits between the data prime and the plaintext modulus. With
# 12 bits, sums of tens of thousands of fresh symmetric ciphertexts (noise
# ~3.2 * sqrt(K) per coefficient) stay an order of magnitude inside it.
_MIN_NOISE_MARGIN_BITS = 12

#: Errors the TenSEAL/SEAL bindings raise on malformed input.
TENSEAL_ERRORS = (ValueError, RuntimeError, TypeError, OverflowError, MemoryError)


@dataclass(frozen=True, kw_only=True)
class HeParams:
    """BFV encryption parameters, validated against 128-bit security.

    Parameters
    ----------
    poly_modulus_degree
        Ring degree N: one ciphertext holds N integers. 4096 is the smallest
        degree whose security budget (109 bits) fits a 60-bit data prime.
    coeff_mod_bit_sizes
        Bit sizes of the coefficient-modulus primes; the last is SEAL's special
        (key-switching) prime, so fresh ciphertexts live under the others.
    plain_modulus_bits
        Size of the plaintext modulus t, a prime = 1 mod 2N chosen by SEAL so
        that batching works. Slots hold integers in (-t/2, t/2): 47 bits give
        46-bit signed sums and leave 13 bits of noise margin under the 60-bit
        data prime.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    plain_modulus_bits: int = 47

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
                f"{sorted(HE_STANDARD_MAX_COEFF_BITS)}; pick one of those (4096 is the default)"
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
                "(one data prime plus the special key-switching prime), e.g. (60, 49)"
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
        t_bits = self.plain_modulus_bits
        if isinstance(t_bits, bool) or not isinstance(t_bits, int) or t_bits < 17:
            raise InvalidConfigError(
                f"plain_modulus_bits must be an int >= 17, got {t_bits!r} (47 is the default)"
            )
        if t_bits > self.data_modulus_bits - _MIN_NOISE_MARGIN_BITS:
            raise InvalidConfigError(
                f"plain_modulus_bits={t_bits} leaves less than {_MIN_NOISE_MARGIN_BITS} bits of "
                f"noise margin under the {self.data_modulus_bits}-bit data modulus, so sums "
                "could decrypt wrongly; lower plain_modulus_bits"
            )

    @property
    def slots(self) -> int:
        """Number of integers one ciphertext holds (N)."""
        return self.poly_modulus_degree

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus fresh ciphertexts live under (all but the special prime)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slot_bits(self) -> int:
        """Signed integers below ``2**slot_bits`` in magnitude decode exactly (t > 2**(bits-1))."""
        return self.plain_modulus_bits - 2

    @cached_property
    def plain_modulus(self) -> int:
        """The plaintext prime t (SEAL's batching prime of ``plain_modulus_bits`` bits)."""
        return int(
            sealapi.PlainModulus.Batching(self.poly_modulus_degree, self.plain_modulus_bits).value()
        )


def _params_of(context: ts.Context) -> HeParams:
    """Read the parameters back out of a TenSEAL context (validating them)."""
    parms = context.seal_context().data.key_context_data().parms()
    if parms.scheme().name != "BFV":
        raise MalformedUpdateError(
            f"the serialized context uses the {parms.scheme().name} scheme, not BFV; "
            "use the context from the consortium's current key ceremony"
        )
    try:
        params = HeParams(
            poly_modulus_degree=int(parms.poly_modulus_degree()),
            coeff_mod_bit_sizes=tuple(int(m.bit_count()) for m in parms.coeff_modulus()),
            plain_modulus_bits=int(parms.plain_modulus().bit_count()),
        )
    except InvalidConfigError as exc:
        raise MalformedUpdateError(
            f"the serialized context has parameters fedvault refuses: {exc}"
        ) from exc
    if int(parms.plain_modulus().value()) != params.plain_modulus:
        raise MalformedUpdateError(
            "the serialized context's plaintext modulus is not SEAL's batching prime for its "
            "size; regenerate the context with HeContext.generate"
        )
    return params


class HeContext:
    """Wraps a :class:`tenseal.Context`: secret (hospitals) or public (coordinator).

    Build one with :meth:`generate` (a new key pair, at the key custodian) or
    :meth:`from_bytes`. Anything that leaves a hospital goes through
    :meth:`serialize_public`, which never writes the secret key. The SEAL
    objects the update path needs (encoder, evaluator, encryptors) are built
    once per context.
    """

    def __init__(self, context: ts.Context, params: HeParams) -> None:
        """Wrap an existing TenSEAL context; prefer :meth:`generate` / :meth:`from_bytes`."""
        self._context = context
        self._params = params

    @classmethod
    def generate(cls, params: HeParams | None = None) -> HeContext:
        """Generate a fresh secret context (new key pair).

        SEAL creates relinearization keys with every context, but they are
        never serialized, and Galois keys are never generated: aggregation
        only adds.
        """
        params = HeParams() if params is None else params
        try:
            context = ts.context(
                ts.SCHEME_TYPE.BFV,
                poly_modulus_degree=params.poly_modulus_degree,
                plain_modulus=params.plain_modulus,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            )
        except TENSEAL_ERRORS as exc:
            raise InvalidConfigError(
                f"SEAL refused BFV parameters {params!r}: {exc}; "
                "try the defaults (4096, (60, 49), 47)"
            ) from exc
        return cls(context, params)

    @classmethod
    def from_bytes(cls, data: bytes) -> HeContext:
        """Load a context written by :meth:`serialize_public` or :meth:`serialize_secret`.

        Raises
        ------
        MalformedUpdateError
            If ``data`` is not a serialized BFV context with a public key and
            parameters that pass :class:`HeParams` validation.
        """
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise MalformedUpdateError(
                "the serialized HE context is empty or not bytes; "
                "re-export it with HeContext.serialize_public()"
            )
        try:
            context = ts.context_from(bytes(data))
        except TENSEAL_ERRORS as exc:
            raise MalformedUpdateError(
                f"cannot parse the serialized HE context ({exc}); the file is corrupt "
                "or truncated: copy the context from the kit again"
            ) from exc
        params = _params_of(context)
        try:
            has_public_key = bool(context.has_public_key())
        except ValueError:  # TenSEAL raises for symmetric-encryption contexts
            has_public_key = False
        if not has_public_key:
            raise MalformedUpdateError(
                "the serialized HE context holds no public key, so nobody could encrypt "
                "under it; re-export it with HeContext.serialize_public()"
            )
        return cls(context, params)

    @property
    def is_private(self) -> bool:
        """Whether this context holds the secret key (can decrypt)."""
        return bool(self._context.is_private())

    @property
    def params(self) -> HeParams:
        """The validated parameters."""
        return self._params

    @property
    def tenseal(self) -> ts.Context:
        """The wrapped TenSEAL context (do not change its keys)."""
        return self._context

    # --- SEAL objects for the update path (built lazily, once) -----------------

    @cached_property
    def seal(self) -> sealapi.SEALContext:
        """The underlying ``seal::SEALContext``."""
        return self._context.seal_context().data

    @cached_property
    def data_parms_id(self) -> list[int]:
        """parms_id of fresh ciphertexts (the data level: one prime)."""
        # cast: the untyped binding returns SEAL's parms_id_type as a list of 4 uint64.
        return cast("list[int]", self.seal.first_parms_id())

    @cached_property
    def encoder(self) -> sealapi.BatchEncoder:
        """SEAL's batch encoder: N integers mod t <-> one plaintext."""
        return sealapi.BatchEncoder(self.seal)

    @cached_property
    def evaluator(self) -> sealapi.Evaluator:
        """SEAL's evaluator (only ``add_inplace`` is used)."""
        return sealapi.Evaluator(self.seal)

    @cached_property
    def public_encryptor(self) -> sealapi.Encryptor:
        """Public-key encryptor (the coordinator's initial model)."""
        return sealapi.Encryptor(self.seal, self._context.public_key().data)

    @cached_property
    def secret_encryptor(self) -> sealapi.Encryptor:
        """Symmetric encryptor: the faster one.

        SEAL can replace half of each ciphertext by the 64-byte seed it was drawn from.

        Raises
        ------
        SecretKeyExposureError
            If this context holds no secret key.
        """
        self._require_secret("encrypt symmetrically")
        return sealapi.Encryptor(self.seal, self._context.secret_key().data)

    @cached_property
    def decryptor(self) -> sealapi.Decryptor:
        """SEAL decryptor (hospitals only).

        Raises
        ------
        SecretKeyExposureError
            If this context holds no secret key.
        """
        self._require_secret("decrypt")
        return sealapi.Decryptor(self.seal, self._context.secret_key().data)

    def _require_secret(self, what: str) -> None:
        if not self.is_private:
            raise SecretKeyExposureError(
                f"this context holds no secret key, so it cannot {what}; decryption and "
                "symmetric encryption happen only at hospitals, with the secret context "
                "from the key ceremony"
            )

    # --- serialization ---------------------------------------------------------

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

    def public(self) -> HeContext:
        """A copy of this context without the secret key."""
        return HeContext.from_bytes(self._public_bytes)

    def serialize_public(self) -> bytes:
        """Serialize parameters and the public key; never the secret key."""
        return self._public_bytes

    def load_ciphertexts(
        self, blobs: Sequence[bytes], start: int, expected: int
    ) -> list[sealapi.Ciphertext]:
        """Parse chunks ``start, start + 1, ...`` of an update of ``expected`` chunks.

        Each must be a fresh BFV ciphertext at this context's data level. Runs in
        the coordinator and in its aggregation workers (:mod:`.he_pool`).

        Raises
        ------
        MalformedUpdateError
            If a chunk does not parse or is not such a ciphertext.
        """
        cts = []
        for i, blob in enumerate(blobs, start=start):
            try:
                ct = seal_bytes.load_ciphertext(self.seal, blob)
            except TENSEAL_ERRORS as exc:
                raise MalformedUpdateError(
                    f"ciphertext chunk {i} of {expected} cannot be parsed ({exc}); the update "
                    "is corrupt or truncated, the sender must resend it"
                ) from exc
            ok = (
                ct.size() == 2
                and ct.parms_id() == self.data_parms_id
                and not ct.is_ntt_form()
                and ct.poly_modulus_degree() == self.params.poly_modulus_degree
            )
            if not ok:
                raise MalformedUpdateError(
                    f"ciphertext chunk {i} of {expected} is not a fresh BFV ciphertext at the "
                    "data level of this context; discard this update"
                )
            cts.append(ct)
        return cts

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
        return f"HeContext({kind}, {self._params!r}, fingerprint={self.fingerprint[:16]}…)"
