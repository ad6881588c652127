"""Masks for secure aggregation: uniform integers mod ``t`` from a cryptographic PRG.

A mask is the ChaCha20 keystream (RFC 8439, from :mod:`cryptography`) of a
32-byte key, read as little-endian 64-bit words and turned into integers in
``[0, t)`` by **rejection sampling**: each word is cut to ``t``'s bit length
and kept only if it is below ``t``. What survives is exactly uniform on
``[0, t)``, with no reduction bias. (The alternative, ``word mod t``, has a
statistical distance of about ``t / 2**64 = 2**-17`` per value for the 47-bit
plaintext prime: over a million values that is no bound at all.) SEAL's
batching prime sits just below ``2**bits``, so nearly every word is kept.

Each key is used for one mask only (keys are derived per round, per pair and
per purpose), so the all-zero ChaCha20 nonce is safe. The keystream is read in
order and the kept words are buffered, so a mask does not depend on how a
caller cuts it into pieces: ``take(3)`` then ``take(5)`` is ``take(8)``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

from fedvault.errors import InvalidConfigError

__all__ = ["KEY_BYTES", "MaskSum", "UniformStream", "centred", "check_modulus"]

#: Bytes of a PRG key (a ChaCha20 key).
KEY_BYTES = 32
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte block counter + 12-byte nonce
_WORD = 8
_BLOCK = 64  # ChaCha20's block size
_LE_U64 = np.dtype("<u8")
# Moduli above 2**62 could overflow the uint64 sum of two residues.
_MAX_MODULUS_BITS = 62

U64 = NDArray[np.uint64]


def check_modulus(modulus: int) -> int:
    """Validate a plaintext modulus for masking: an int in ``[3, 2**62)``.

    Raises
    ------
    InvalidConfigError
        If it is not.
    """
    if isinstance(modulus, bool) or not isinstance(modulus, int | np.integer):
        raise InvalidConfigError(f"the plaintext modulus must be an int, got {modulus!r}")
    if not 3 <= int(modulus) < 2**_MAX_MODULUS_BITS:
        raise InvalidConfigError(
            f"the plaintext modulus {modulus} is outside [3, 2**{_MAX_MODULUS_BITS}); "
            "pass HeContext.params.plain_modulus"
        )
    return int(modulus)


class UniformStream:
    """Exactly uniform integers in ``[0, modulus)`` from the ChaCha20 keystream of ``key``.

    Parameters
    ----------
    key
        32 bytes, used for this one stream only.
    modulus
        The plaintext modulus ``t``.
    """

    def __init__(self, key: bytes, modulus: int) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise InvalidConfigError(f"a PRG key is {KEY_BYTES} bytes")
        self._t = np.uint64(check_modulus(modulus))
        bits = int(modulus).bit_length()
        self._cut = np.uint64((1 << bits) - 1)
        self._keep = int(modulus) / float(1 << bits)  # expected fraction of words kept (> 1/2)
        self._cipher = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        self._spare: U64 = np.empty(0, dtype=np.uint64)

    def _draw(self, words: int) -> U64:
        """The next ``words`` keystream words, cut to the modulus' bit length, those kept."""
        buf = bytearray(words * _WORD + _BLOCK)  # update_into wants a block of slack
        self._cipher.update_into(bytes(words * _WORD), buf)
        values: U64 = np.frombuffer(buf, dtype=_LE_U64, count=words)
        if sys.byteorder != "little":  # a big-endian host: swap once
            values = values.astype(np.uint64)
        values &= self._cut
        reject = values >= self._t
        if reject.any():
            values = values[~reject]
        return values

    def take(self, count: int) -> U64:
        """The next ``count`` values of the stream (uint64, each in ``[0, modulus)``)."""
        if count < 0:
            raise InvalidConfigError(f"cannot take {count} values")
        parts = [self._spare] if self._spare.size else []
        have = self._spare.size
        while have < count:
            missing = count - have
            # The expected rejections twice over: one draw nearly always suffices.
            words = missing + int(2 * missing * (1 - self._keep)) + 16
            part = self._draw(words)
            parts.append(part)
            have += part.size
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if not parts:
            joined = self._spare
        self._spare = joined[count:]
        out: U64 = joined[:count]
        return out


class MaskSum:
    """A signed sum of mask streams, mod ``modulus``.

    One party's whole mask, or the coordinator's correction.

    Parameters
    ----------
    modulus
        The plaintext modulus ``t``.
    terms
        ``(sign, stream)`` pairs; ``sign`` is ``+1`` (add the stream) or ``-1``
        (subtract it).
    """

    def __init__(self, modulus: int, terms: Sequence[tuple[int, UniformStream]]) -> None:
        self.modulus = check_modulus(modulus)
        for sign, _ in terms:
            if sign not in (1, -1):
                raise InvalidConfigError(f"a mask's sign is +1 or -1, got {sign!r}")
        self._terms = list(terms)

    @property
    def terms(self) -> int:
        """Number of streams summed."""
        return len(self._terms)

    def take(self, count: int) -> U64:
        """The next ``count`` values of the sum, each in ``[0, modulus)``."""
        t = np.uint64(self.modulus)
        acc: U64 = np.zeros(count, dtype=np.uint64)
        scratch: U64 = np.empty(count, dtype=np.uint64)
        for sign, stream in self._terms:
            values = stream.take(count)
            if sign > 0:
                acc += values  # both < t < 2**62: no overflow
            else:
                np.subtract(t, values, out=scratch)  # in (0, t]
                acc += scratch
            # acc < 2t; acc - t wraps around to above 2t when acc < t, so the
            # smaller of the two is acc mod t.
            np.subtract(acc, t, out=scratch)
            np.minimum(acc, scratch, out=acc)
        return acc

    def apply(self, ints: NDArray[np.integer]) -> NDArray[np.int64]:
        """Add the next ``len(ints)`` mask values to ``ints``; the result in ``[0, t)``.

        ``ints`` are signed, ``|x| < t/2``; the result is int64.

        Raises
        ------
        InvalidConfigError
            If a value is outside ``(-t/2, t/2)``: it would not decode to itself.
        """
        x = np.asarray(ints)
        if x.ndim != 1 or x.dtype.kind not in "iu":
            raise InvalidConfigError(f"masking needs a 1-D integer vector, got {x.dtype} {x.shape}")
        half = self.modulus // 2
        if x.size and (int(x.max()) > half or int(x.min()) < -half):
            raise InvalidConfigError(
                "a fixed-point value is outside (-t/2, t/2), so it would not survive the "
                "plaintext modulus; lower value_bound_bits or scale_bits"
            )
        signed = x.astype(np.int64)  # a copy
        signed[signed < 0] += np.int64(self.modulus)  # now in [0, t)
        residues = signed.view(np.uint64)
        residues += self.take(x.size)  # < 2t
        np.minimum(residues, residues - np.uint64(self.modulus), out=residues)  # see take()
        return signed


def centred(residues: NDArray[np.integer], modulus: int) -> NDArray[np.int64]:
    """Residues in ``[0, t)`` as signed representatives in ``(-t/2, t/2]``.

    The form SEAL's batch encoder and ``decode_int64`` use.
    """
    r = np.asarray(residues).astype(np.int64)
    return np.where(r > modulus // 2, r - np.int64(modulus), r)
