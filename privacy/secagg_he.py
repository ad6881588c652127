"""Masking where the integers live: between fixed-point encoding and BFV batching.

:func:`fedvault.privacy.he.encrypt_update` turns each slot-sized piece of the
model into signed fixed-point integers (``fixed_point.encode``) and hands them
to SEAL's batch encoder, which reduces them mod the plaintext prime ``t``. That
hand-over is the one place an update exists as integers mod ``t``, so that is
where :func:`encrypt_masked_update` adds the mask: its encoder adds the next
values of a :class:`~fedvault.privacy.secagg_prg.MaskSum` to each piece and
passes the result on in SEAL's centred form. Ciphertexts, envelopes and the
coordinator's :class:`~fedvault.privacy.he.Aggregator` are unchanged.

:func:`apply_correction` is the coordinator's last step: it subtracts the
correction from every chunk of the encrypted sum as a plaintext (BFV
``sub_plain``: exact, and it adds no noise), so the aggregate decrypts to the
survivors' unmasked sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi

from fedvault.errors import KeyMismatchError, MalformedUpdateError
from fedvault.privacy import he, seal_bytes
from fedvault.privacy.fixed_point import FixedPoint
from fedvault.privacy.he_context import TENSEAL_ERRORS, HeContext
from fedvault.privacy.packing import Layout
from fedvault.privacy.secagg_prg import MaskSum, centred

__all__ = ["apply_correction", "encrypt_masked_update"]


class _MaskingEncoder:
    """SEAL's batch encoder with the mask added to each vector it encodes."""

    def __init__(self, inner: Any, mask: MaskSum) -> None:
        self._inner = inner
        self._mask = mask

    def encode(self, values: list[int], plain: Any) -> None:
        masked = self._mask.apply(np.asarray(values, dtype=np.int64))
        self._inner.encode(centred(masked, self._mask.modulus).tolist(), plain)


class _MaskingContext(HeContext):
    """``ctx`` with a masking encoder: the same keys, fingerprint and SEAL objects."""

    def __init__(self, ctx: HeContext, mask: MaskSum) -> None:
        super().__init__(ctx.tenseal, ctx.params)
        # Seed the cached properties the update path reads from the wrapped context.
        cache = vars(self)
        cache["seal"] = ctx.seal
        cache["fingerprint"] = ctx.fingerprint
        cache["encoder"] = _MaskingEncoder(ctx.encoder, mask)
        if ctx.is_private:
            cache["secret_encryptor"] = ctx.secret_encryptor


def encrypt_masked_update(
    ctx: HeContext,
    arrays: Mapping[str, np.ndarray],
    *,
    mask: MaskSum,
    weight: float,
    key_epoch: int = 0,
    job: str = "",
    server_round: int = 0,
    encoding: FixedPoint | None = None,
) -> bytes:
    """Encrypt an update as :func:`~fedvault.privacy.he.encrypt_update` does, masked.

    ``mask`` is added to the fixed-point integers before they are encrypted.

    ``mask`` is the hospital's :meth:`MaskingSession.mask_stream`, consumed here
    once, in layout order. The envelope is an ordinary one; a single masked update
    decrypts to values uniform mod ``t``, only the corrected sum means anything.

    Raises
    ------
    MalformedUpdateError
        As :func:`~fedvault.privacy.he.encrypt_update`.
    KeyMismatchError
        If ``mask`` was built for another plaintext modulus.
    """
    if mask.modulus != ctx.params.plain_modulus:
        raise KeyMismatchError(
            f"the mask is mod {mask.modulus}, the context's plaintext modulus is "
            f"{ctx.params.plain_modulus}; build the MaskingSession with ctx.params.plain_modulus"
        )
    return he.encrypt_update(
        _MaskingContext(ctx, mask),
        arrays,
        weight=weight,
        key_epoch=key_epoch,
        job=job,
        server_round=server_round,
        encoding=encoding,
    )


def apply_correction(ctx: HeContext, aggregate: bytes, correction: MaskSum) -> bytes:
    """Subtract ``correction`` from an encrypted sum, chunk by chunk; the new envelope.

    ``ctx`` may be public (the coordinator's). ``correction`` is
    :meth:`UnmaskingSession.correction_stream`, consumed here once.

    Raises
    ------
    KeyMismatchError
        If the envelope is under another key or ``correction`` under another modulus.
    MalformedUpdateError
        If the envelope or one of its chunks is malformed.
    """
    t = ctx.params.plain_modulus
    if correction.modulus != t:
        raise KeyMismatchError(
            f"the correction is mod {correction.modulus}, the context's plaintext modulus is {t}"
        )
    env = he.parse_envelope(aggregate)
    if env.context_fingerprint != ctx.fingerprint:
        raise KeyMismatchError(
            "the aggregate is encrypted under another HE context than the one given; "
            "correct it with the context it was summed under"
        )
    remaining = Layout.from_proto(env.layout).size
    slots = ctx.params.slots
    if len(env.chunks) != -(-remaining // slots):
        raise MalformedUpdateError(
            f"the aggregate has {len(env.chunks)} chunks for {remaining} values at {slots} each"
        )
    plain = sealapi.Plaintext()
    chunks = []
    for blob in env.chunks:
        count = min(slots, remaining)
        remaining -= count
        try:
            ct = seal_bytes.load_ciphertext(ctx.seal, blob)
        except TENSEAL_ERRORS as exc:
            raise MalformedUpdateError(f"an aggregate chunk cannot be parsed ({exc})") from exc
        ctx.encoder.encode(centred(correction.take(count), t).tolist(), plain)
        ctx.evaluator.sub_plain_inplace(ct, plain)
        chunks.append(seal_bytes.dump(ct))
    del env.chunks[:]
    env.chunks.extend(chunks)
    out: bytes = env.SerializeToString()
    return out
