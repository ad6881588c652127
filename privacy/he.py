"""Encrypt, aggregate and decrypt whole model updates under CKKS.

A hospital flattens its model into one vector (:mod:`fedvault.privacy.packing`),
multiplies it by its sample count, and encrypts it in ``ceil(size / slots)``
ciphertexts: FedAvg's weighting happens before encryption, so the coordinator
only ever *adds* ciphertexts (:class:`Aggregator`), which needs nothing but the
public context. Hospitals decrypt the sum and divide by the total weight
(:func:`decrypt_average`).

Every check an :class:`Aggregator` makes happens before any arithmetic:
ciphertexts under another key add without error and decrypt to garbage, and a
half-added update would corrupt the running sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import tenseal as ts
from google.protobuf.message import DecodeError

from fedvault.privacy.ckks import CkksContext
from fedvault.privacy.errors import (
    InvalidConfigError,
    KeyMismatchError,
    MalformedUpdateError,
    SecretKeyExposureError,
)
from fedvault.privacy.packing import Layout, flatten, unflatten
from fedvault.proto import update_pb2

__all__ = [
    "FORMAT_VERSION",
    "SCHEME",
    "Aggregator",
    "decrypt_average",
    "decrypt_update",
    "encrypt_update",
    "parse_envelope",
]

#: Version of the envelope semantics written by this module.
FORMAT_VERSION = 1
#: The only scheme this module writes and reads.
SCHEME = "ckks"

# A single update may use at most 2**-10 of the modulus headroom, so that up to
# 1024 updates of that magnitude still sum without wrapping around.
_SUM_HEADROOM_BITS = 10
_UINT32_MAX = 2**32 - 1
_TS_ERRORS = (ValueError, RuntimeError, TypeError, OverflowError, MemoryError)

_REKEY_HINT = "the hospital must re-run the key ceremony or install the current kit"


def _check_uint32(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
        raise InvalidConfigError(f"{name} must be an int in [0, 2**32 - 1], got {value!r}")
    return value


def _check_weight(weight: float, what: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.floating | np.integer):
        raise MalformedUpdateError(f"{what} must be a number, got {weight!r}")
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
        raise MalformedUpdateError(
            f"{what} must be finite and > 0 (the sample count), got {weight!r}; "
            "a hospital with no samples must not send an update"
        )
    return w


def encrypt_update(
    ctx: CkksContext,
    arrays: Mapping[str, np.ndarray],
    *,
    weight: float,
    key_epoch: int = 0,
    job: str = "",
    server_round: int = 0,
) -> bytes:
    """Weight and encrypt a model update into a serialized envelope.

    Parameters
    ----------
    ctx
        Secret or public context: encryption uses the public key, so the
        coordinator can encrypt the initial model too.
    arrays
        Named floating-point tensors, packed in mapping order.
    weight
        Multiplies every value before encryption (the sample count), so that
        the coordinator's plain sum of ciphertexts is the FedAvg numerator.
    key_epoch, job, server_round
        Recorded in the envelope and checked by the receiver.

    Raises
    ------
    MalformedUpdateError
        On a non-positive or non-finite weight, non-float or non-finite
        values, an empty update, or values too large for the CKKS modulus.
    """
    w = _check_weight(weight, "weight")
    _check_uint32("key_epoch", key_epoch)
    _check_uint32("server_round", server_round)
    layout, vector = flatten(arrays)
    if layout.size == 0:
        raise MalformedUpdateError(
            "the update holds no values; pass the model's floating-point tensors"
        )
    with np.errstate(over="ignore"):  # an overflow to inf is refused just below
        vector *= w
    limit = ctx.params.max_abs_value / 2**_SUM_HEADROOM_BITS
    peak = float(np.max(np.abs(vector)))
    if not peak <= limit:  # also catches inf from weight * value overflow
        raise MalformedUpdateError(
            f"weighted values reach {peak:.3g}, beyond the {limit:.3g} this CKKS context can "
            "sum without overflow; check the update for divergence, or use a context "
            "with a wider coefficient modulus"
        )
    slots = ctx.params.slots
    raw = ctx.tenseal.data
    chunks = [
        ts._ts_cpp.CKKSVector(raw, vector[start : start + slots].tolist()).serialize()
        for start in range(0, layout.size, slots)
    ]
    return _envelope(ctx, key_epoch, layout, chunks, w, job, server_round)


def _envelope(
    ctx: CkksContext,
    key_epoch: int,
    layout: Layout,
    chunks: Sequence[bytes],
    weight: float,
    job: str,
    server_round: int,
) -> bytes:
    env = update_pb2.UpdateEnvelope(
        format_version=FORMAT_VERSION,
        context_fingerprint=ctx.fingerprint,
        key_epoch=key_epoch,
        layout=layout.to_proto(),
        chunks=chunks,
        sample_weight=weight,
        job=job,
        server_round=server_round,
        scheme=SCHEME,
    )
    serialized: bytes = env.SerializeToString()
    return serialized


def parse_envelope(data: bytes) -> update_pb2.UpdateEnvelope:
    """Parse a serialized envelope and check its version and scheme.

    Raises
    ------
    MalformedUpdateError
        If ``data`` is not an envelope of :data:`FORMAT_VERSION` and scheme
        ``"ckks"``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedUpdateError(f"an update must be bytes, got {type(data).__name__}")
    env = update_pb2.UpdateEnvelope()
    try:
        env.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise MalformedUpdateError(
            f"cannot parse the update envelope ({exc}); it is corrupt or truncated, "
            "the sender must resend it"
        ) from exc
    if env.format_version != FORMAT_VERSION:
        raise MalformedUpdateError(
            f"update envelope format_version={env.format_version}, this fedvault reads "
            f"only {FORMAT_VERSION}; run the same fedvault version at every site"
        )
    if env.scheme != SCHEME:
        raise MalformedUpdateError(
            f"update envelope scheme {env.scheme!r}, expected {SCHEME!r}; the sender is "
            "configured for another secure_aggregation mode"
        )
    return env


def _check_key(ctx: CkksContext, env: update_pb2.UpdateEnvelope, key_epoch: int | None) -> None:
    if env.context_fingerprint != ctx.fingerprint:
        raise KeyMismatchError(
            f"update is encrypted under CKKS context {env.context_fingerprint[:16] or '<none>'}…, "
            f"expected {ctx.fingerprint[:16]}… (key epoch {env.key_epoch}); {_REKEY_HINT}"
        )
    if key_epoch is not None and env.key_epoch != key_epoch:
        raise KeyMismatchError(
            f"update is for key epoch {env.key_epoch}, expected epoch {key_epoch} "
            f"(context {ctx.fingerprint[:16]}…); {_REKEY_HINT}"
        )


def _load_chunks(ctx: CkksContext, env: update_pb2.UpdateEnvelope, layout: Layout) -> list[Any]:
    """Deserialize and validate every chunk (count, size, level, scale)."""
    params = ctx.params
    slots = params.slots
    expected = math.ceil(layout.size / slots)
    if layout.size == 0 or len(env.chunks) != expected:
        raise MalformedUpdateError(
            f"update has {len(env.chunks)} ciphertext chunks, its layout of {layout.size} "
            f"values needs {expected} at {slots} slots each; discard it"
        )
    raw = ctx.tenseal.data
    seal = ctx.tenseal.seal_context().data
    first_parms = seal.first_parms_id()
    scale = float(2**params.global_scale_bits)
    vectors = []
    for i, blob in enumerate(env.chunks):
        want = min(slots, layout.size - i * slots)
        try:
            vec = ts._ts_cpp.CKKSVector(raw, blob)
            cts = vec.ciphertext()
        except _TS_ERRORS as exc:
            raise MalformedUpdateError(
                f"ciphertext chunk {i} of {expected} cannot be parsed ({exc}); the update "
                "is corrupt or truncated, the sender must resend it"
            ) from exc
        ok = (
            vec.size() == want
            and len(cts) == 1
            and cts[0].size() == 2
            and cts[0].parms_id() == first_parms
            and cts[0].scale == scale
        )
        if not ok:
            raise MalformedUpdateError(
                f"ciphertext chunk {i} of {expected} does not hold {want} fresh values at "
                f"scale 2**{params.global_scale_bits}; discard this update"
            )
        vectors.append(vec)
    return vectors


def _layout_diff(got: Layout, want: Layout) -> str:
    """Describe the first difference between two layouts, for error messages."""
    for i, (g, w) in enumerate(zip(got.tensors, want.tensors, strict=False)):
        if g != w:
            return (
                f"tensor {i} is {g.name!r} {g.shape} {g.dtype}, "
                f"expected {w.name!r} {w.shape} {w.dtype}"
            )
    return f"{len(got.tensors)} tensors, expected {len(want.tensors)}"


class Aggregator:
    """Streaming, in-place sum of encrypted updates. Holds only a public context.

    Parameters
    ----------
    ctx
        The consortium's public context; a secret one is refused, since the
        coordinator must never be able to decrypt.
    key_epoch
        Key epoch every update must carry.
    job, server_round
        When given (non-empty / not None), every update must carry them.
    """

    def __init__(
        self,
        ctx: CkksContext,
        *,
        key_epoch: int = 0,
        job: str = "",
        server_round: int | None = None,
    ) -> None:
        if ctx.is_private:
            raise SecretKeyExposureError(
                "Aggregator was given a context holding the secret key; the coordinator "
                "must only ever hold the public one: pass ctx.public()"
            )
        self._ctx = ctx
        self._key_epoch = _check_uint32("key_epoch", key_epoch)
        self._job = job
        self._round = None if server_round is None else _check_uint32("server_round", server_round)
        self._layout: Layout | None = None
        self._sum: list[Any] | None = None
        self._count = 0
        self._total_weight = 0.0
        self._result_round = 0 if server_round is None else server_round
        self._result_job = job

    @property
    def count(self) -> int:
        """Number of updates summed so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the summed updates' sample weights."""
        return self._total_weight

    def add(self, data: bytes) -> None:
        """Validate one serialized update and add it to the running sum.

        Raises
        ------
        KeyMismatchError
            If the update is under another key or key epoch.
        MalformedUpdateError
            On anything else wrong with it. A rejected update leaves the
            running sum untouched.
        """
        env = parse_envelope(data)
        _check_key(self._ctx, env, self._key_epoch)
        if self._job and env.job != self._job:
            raise MalformedUpdateError(
                f"update belongs to job {env.job!r}, this aggregation is for job {self._job!r}; "
                "discard it"
            )
        if self._round is not None and env.server_round != self._round:
            raise MalformedUpdateError(
                f"update answers round {env.server_round}, this aggregation is for round "
                f"{self._round}; it is stale, discard it"
            )
        layout = Layout.from_proto(env.layout)
        if self._layout is not None and layout != self._layout:
            diff = _layout_diff(layout, self._layout)
            raise MalformedUpdateError(
                f"update's layout differs from the first update's: {diff}; the hospital "
                "runs another model version, discard this update"
            )
        weight = _check_weight(env.sample_weight, "sample_weight")
        vectors = _load_chunks(self._ctx, env, layout)

        # Everything is validated: from here on nothing can fail half-way.
        if self._sum is None:
            self._sum = vectors
            self._layout = layout
            self._result_round = env.server_round if self._round is None else self._round
            self._result_job = self._job or env.job
        else:
            for acc, vec in zip(self._sum, vectors, strict=True):
                acc.add_(vec)
        self._count += 1
        self._total_weight += weight

    def result(self) -> bytes:
        """The serialized envelope of the sum (sample_weight = total weight).

        Raises
        ------
        MalformedUpdateError
            If no update was added.
        """
        if self._sum is None or self._layout is None:
            raise MalformedUpdateError(
                "no update was added, so there is no aggregate; wait for at least one "
                "valid reply before closing the round"
            )
        chunks = [vec.serialize() for vec in self._sum]
        return _envelope(
            self._ctx,
            self._key_epoch,
            self._layout,
            chunks,
            self._total_weight,
            self._result_job,
            self._result_round,
        )


def _decrypt(
    ctx: CkksContext, data: bytes, key_epoch: int | None
) -> tuple[Layout, np.ndarray, float]:
    if not ctx.is_private:
        raise SecretKeyExposureError(
            "this context holds no secret key, so it cannot decrypt; decryption happens "
            "only at hospitals, with the secret context from the key ceremony"
        )
    env = parse_envelope(data)
    _check_key(ctx, env, key_epoch)
    layout = Layout.from_proto(env.layout)
    weight = _check_weight(env.sample_weight, "sample_weight")
    vectors = _load_chunks(ctx, env, layout)
    vector = np.concatenate([np.asarray(vec.decrypt(), dtype=np.float64) for vec in vectors])
    return layout, vector, weight


def decrypt_update(
    ctx: CkksContext, data: bytes, *, key_epoch: int | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """Decrypt an update or aggregate: the weighted sum (float64) and the total weight.

    Raises
    ------
    SecretKeyExposureError
        If ``ctx`` holds no secret key (only hospitals decrypt).
    KeyMismatchError
        If the envelope is under another key, or ``key_epoch`` is given and differs.
    MalformedUpdateError
        If the envelope or a chunk is malformed.
    """
    layout, vector, weight = _decrypt(ctx, data, key_epoch)
    as_f64 = Layout(tensors=tuple(replace(t, dtype="float64") for t in layout.tensors))
    return unflatten(as_f64, vector), weight


def decrypt_average(
    ctx: CkksContext, data: bytes, *, key_epoch: int | None = None
) -> dict[str, np.ndarray]:
    """Decrypt and divide by the total weight: the FedAvg model, in original dtypes.

    Raises the same errors as :func:`decrypt_update`.
    """
    layout, vector, weight = _decrypt(ctx, data, key_epoch)
    return unflatten(layout, vector / weight)
