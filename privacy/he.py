"""Encrypt, aggregate and decrypt whole model updates (BFV, fixed point).

A hospital flattens its model into one vector (:mod:`fedvault.privacy.packing`),
turns it into fixed-point integers weighted by its sample count
(:mod:`fedvault.privacy.fixed_point`) and encrypts them ``N`` at a time:
FedAvg's weighting happens before encryption, so the coordinator only ever
*adds* ciphertexts (:class:`Aggregator`), which needs nothing but the public
context. Hospitals decrypt the sum and divide by the total weight
(:func:`decrypt_average`).

Hospitals encrypt with the secret key they already hold (symmetric
encryption): it is faster than public-key encryption, and SEAL then sends a
64-byte seed instead of the ciphertext's uniformly random half, so an update
costs about 8 bytes per value on the wire. The coordinator encrypts only the
initial model, with the public key.

Every check an :class:`Aggregator` makes happens before any arithmetic:
ciphertexts under another key add without error and decrypt to garbage, and a
half-added update would corrupt the running sum.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as sealapi
from google.protobuf.message import DecodeError

from fedvault.errors import (
    InvalidConfigError,
    KeyMismatchError,
    MalformedUpdateError,
    SecretKeyExposureError,
)
from fedvault.privacy import fixed_point, he_pool, seal_bytes
from fedvault.privacy.fixed_point import FixedPoint
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.packing import Layout, Scatter, iter_slices, layout_of
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
FORMAT_VERSION = 2
#: The only scheme this module writes and reads.
SCHEME = "bfv-fixed"

_UINT32_MAX = 2**32 - 1

#: Fewer chunks per process than this and the pipe round trips cost more than
#: the parallel parsing saves (one chunk parses in ~0.25 ms).
_MIN_CHUNKS_PER_PROCESS = 16

_REKEY_HINT = "the hospital must re-run the key ceremony or install the current kit"


def _cores() -> int:
    """Cores this process may run on (its affinity, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


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


def _spec(ctx: HeContext, scale_bits: int, value_bound_bits: int) -> FixedPoint:
    try:
        return FixedPoint(
            scale_bits=scale_bits,
            value_bound_bits=value_bound_bits,
            slot_bits=ctx.params.slot_bits,
        )
    except InvalidConfigError as exc:
        raise MalformedUpdateError(f"the update's fixed-point encoding is invalid: {exc}") from exc


def encrypt_update(
    ctx: HeContext,
    arrays: Mapping[str, np.ndarray],
    *,
    weight: float,
    key_epoch: int = 0,
    job: str = "",
    server_round: int = 0,
    encoding: FixedPoint | None = None,
) -> bytes:
    """Weight, encode and encrypt a model update into a serialized envelope.

    Parameters
    ----------
    ctx
        A secret context encrypts symmetrically (hospitals); a public one with
        the public key (the coordinator's initial model).
    arrays
        Named floating-point tensors, packed in mapping order.
    weight
        Multiplies every value before encryption (the sample count), so that
        the coordinator's plain sum of ciphertexts is the FedAvg numerator.
    key_epoch, job, server_round
        Recorded in the envelope and checked by the receiver.
    encoding
        Fixed-point parameters; the defaults suit models whose values stay
        below 256 in magnitude.

    Raises
    ------
    MalformedUpdateError
        On a non-positive or non-finite weight, non-float or non-finite
        values, an empty update, or values beyond the encoding's bound.
    """
    w = _check_weight(weight, "weight")
    _check_uint32("key_epoch", key_epoch)
    _check_uint32("server_round", server_round)
    spec = encoding or FixedPoint(slot_bits=ctx.params.slot_bits)
    if spec.slot_bits != ctx.params.slot_bits:
        raise InvalidConfigError(
            f"encoding assumes {spec.slot_bits}-bit slots, the context has "
            f"{ctx.params.slot_bits}; build it with slot_bits=ctx.params.slot_bits"
        )
    layout = layout_of(arrays)
    if layout.size == 0:
        raise MalformedUpdateError(
            "the update holds no values; pass the model's floating-point tensors"
        )
    encoder = ctx.encoder
    private = ctx.is_private
    plain = sealapi.Plaintext()

    def encrypt(piece: np.ndarray) -> bytes:
        encoder.encode(fixed_point.encode(piece, weight=w, spec=spec).tolist(), plain)
        if private:
            # Returns SEAL's Serializable: saved as c0 plus the seed of c1.
            return seal_bytes.dump(ctx.secret_encryptor.encrypt_symmetric(plain))
        ct = sealapi.Ciphertext()
        ctx.public_encryptor.encrypt(plain, ct)
        return seal_bytes.dump(ct)

    # One slot-sized piece at a time, appended to the envelope as it is encrypted:
    # a hospital never holds the model as one flat vector, nor its ciphertexts twice.
    out = bytearray(_envelope(ctx, key_epoch, layout, (), w, job, server_round, spec))
    for piece in iter_slices(arrays, ctx.params.slots):
        # Protobuf merges concatenated messages, appending repeated fields: each
        # one-chunk message extends the envelope's chunk list, in order.
        out += update_pb2.UpdateEnvelope(chunks=[encrypt(piece)]).SerializeToString()
    return bytes(out)


def _envelope(
    ctx: HeContext,
    key_epoch: int,
    layout: Layout,
    chunks: Sequence[bytes],
    weight: float,
    job: str,
    server_round: int,
    spec: FixedPoint,
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
        scale_bits=spec.scale_bits,
        value_bound_bits=spec.value_bound_bits,
    )
    serialized: bytes = env.SerializeToString()
    return serialized


def parse_envelope(data: bytes) -> update_pb2.UpdateEnvelope:
    """Parse a serialized envelope and check its version and scheme.

    Raises
    ------
    MalformedUpdateError
        If ``data`` is not an envelope of :data:`FORMAT_VERSION` and scheme
        ``"bfv-fixed"``.
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
    return _check_header(env)


def _check_header(env: update_pb2.UpdateEnvelope) -> update_pb2.UpdateEnvelope:
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


def _check_key(ctx: HeContext, env: update_pb2.UpdateEnvelope, key_epoch: int | None) -> None:
    if env.context_fingerprint != ctx.fingerprint:
        raise KeyMismatchError(
            f"update is encrypted under HE context {env.context_fingerprint[:16] or '<none>'}…, "
            f"expected {ctx.fingerprint[:16]}… (key epoch {env.key_epoch}); {_REKEY_HINT}"
        )
    if key_epoch is not None and env.key_epoch != key_epoch:
        raise KeyMismatchError(
            f"update is for key epoch {env.key_epoch}, expected epoch {key_epoch} "
            f"(context {ctx.fingerprint[:16]}…); {_REKEY_HINT}"
        )


def _check_chunks(ctx: HeContext, chunks: Sequence[bytes], layout: Layout) -> int:
    """Check the count and size of every chunk before any is parsed; returns the count."""
    params = ctx.params
    slots = params.slots
    expected = math.ceil(layout.size / slots)
    if layout.size == 0 or len(chunks) != expected:
        raise MalformedUpdateError(
            f"update has {len(chunks)} ciphertext chunks, its layout of {layout.size} "
            f"values needs {expected} at {slots} values each; discard it"
        )
    # A full ciphertext: 2 polynomials x N coefficients x 8 bytes, plus a header.
    # Refuse anything larger before SEAL allocates for it.
    max_bytes = 2 * slots * 8 * (len(params.coeff_mod_bit_sizes) - 1) + 4096
    for i, blob in enumerate(chunks):
        if len(blob) > max_bytes:
            raise MalformedUpdateError(
                f"ciphertext chunk {i} of {expected} is {len(blob)} bytes, more than a "
                f"ciphertext of these parameters can be ({max_bytes}); discard this update"
            )
    return expected


def _load_chunks(
    ctx: HeContext,
    env: update_pb2.UpdateEnvelope,
    layout: Layout,
    *,
    start: int = 0,
    stop: int | None = None,
) -> list[Any]:
    """Deserialize and validate chunks ``start:stop`` (default all).

    The count and sizes of every chunk are checked first, whatever the window.
    """
    expected = _check_chunks(ctx, env.chunks, layout)
    return ctx.load_ciphertexts(env.chunks[start:stop], start, expected)


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
    processes
        Processes that parse and sum an update's chunks, this one included
        (TenSEAL holds the GIL while SEAL parses, so threads would not run in
        parallel); default: one per core. Each process gets at least 16
        chunks, so small updates use fewer (under 32 chunks: this one alone).
        Worker processes start once per coordinator process, at the first
        update that needs them, and serve every later round.
    loader_threads
        The former name of ``processes``, kept for callers that still pass it.
    """

    def __init__(
        self,
        ctx: HeContext,
        *,
        key_epoch: int = 0,
        job: str = "",
        server_round: int | None = None,
        processes: int | None = None,
        loader_threads: int | None = None,
    ) -> None:
        for name, value in (("processes", processes), ("loader_threads", loader_threads)):
            if value is not None and value < 1:
                raise InvalidConfigError(f"{name}={value} must be >= 1 (or None: one per core)")
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
        self._spec: FixedPoint | None = None
        self._sum: list[Any] | None = None
        self._count = 0
        self._total_weight = 0.0
        self._result_round = 0 if server_round is None else server_round
        self._result_job = job
        self._processes = processes or loader_threads or _cores()
        # Chunk ranges [start, stop) summed by worker processes, fixed by the first
        # update (every later one has the same layout); this process sums [0, _own).
        self._shares: list[tuple[int, int, int]] = []
        self._own: int | None = None
        self._pool: he_pool.WorkerPool | None = None
        self._pool_id = 0
        self._pool_failed = False

    @property
    def count(self) -> int:
        """Number of updates summed so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the summed updates' sample weights."""
        return self._total_weight

    def add(self, data: bytes | update_pb2.UpdateEnvelope, weight: float | None = None) -> None:
        """Validate one update and add it to the running sum.

        ``data`` is the serialized envelope, or the envelope :func:`parse_envelope`
        already returned (the coordinator parses it once to check it against the
        round's model first; a second parse of a multi-megabyte message is waste).
        ``weight``, when given, is the sample weight the caller expects (the
        reply's sample count): the weight is already inside the ciphertext, so it
        is only checked against the envelope's ``sample_weight``.

        Raises
        ------
        KeyMismatchError
            If the update is under another key or key epoch.
        MalformedUpdateError
            On anything else wrong with it. A rejected update leaves the
            running sum untouched.
        FedvaultError
            If a worker process summing part of the chunks died: that part of
            the sum is lost, so the round must be retried.
        """
        if isinstance(data, update_pb2.UpdateEnvelope):
            env = _check_header(data)
        else:
            env = parse_envelope(data)
        _check_key(self._ctx, env, self._key_epoch)
        self._check_job_and_round(env)
        layout = self._check_layout(Layout.from_proto(env.layout))
        spec = self._check_encoding(_spec(self._ctx, env.scale_bits, env.value_bound_bits))
        total = self._check_sample_weight(env.sample_weight, weight, spec)
        # Each access to a repeated bytes field copies the bytes: take them once.
        blobs = list(env.chunks)
        expected = _check_chunks(self._ctx, blobs, layout)
        if self._sum is None:
            self._split(expected)
        cts = self._load_shared(blobs, expected)

        # Everything is validated: from here on nothing can fail half-way.
        if self._sum is None:
            self._sum = cts
            self._layout = layout
            self._spec = spec
            self._result_round = env.server_round if self._round is None else self._round
            self._result_job = self._job or env.job
        else:
            add = self._ctx.evaluator.add_inplace
            for acc, ct in zip(self._sum, cts, strict=True):
                add(acc, ct)
        self._count += 1
        self._total_weight = total

    def _split(self, chunks: int) -> None:
        """Share the chunk indices among this process and the workers.

        Done for each update until one is accepted: the first accepted update
        fixes the layout, hence the shares, for the rest of the aggregation.
        """
        self._own, self._shares = chunks, []
        procs = min(self._processes, chunks // _MIN_CHUNKS_PER_PROCESS)
        if procs < 2 or not self._open_workers(procs - 1):
            return
        assert self._pool is not None
        procs = min(procs, len(self._pool.workers) + 1)
        # This process also parses the envelopes and feeds the workers (about a
        # tenth of its share's cost), so it keeps a little less than a fair share.
        own = chunks * 9 // (10 * procs)
        bounds = [own + (chunks - own) * k // (procs - 1) for k in range(procs)]
        self._own = own
        self._shares = [(k, bounds[k], bounds[k + 1]) for k in range(procs - 1)]

    def _open_workers(self, count: int) -> bool:
        """Open this aggregation at every worker of the pool (once); False if there is none."""
        if self._pool is None and not self._pool_failed:
            pool = he_pool.pool(count)
            self._pool_failed = pool is None
            if pool is not None:
                self._pool, self._pool_id = pool, pool.new_id()
                message = (
                    "open",
                    self._pool_id,
                    self._ctx.serialize_public(),
                    self._ctx.fingerprint,
                )
                with pool.lock:
                    for worker in range(len(pool.workers)):
                        pool.send(worker, message)
                weakref.finalize(self, pool.drop_later, self._pool_id)
        return self._pool is not None

    def _load_shared(self, blobs: list[bytes], expected: int) -> list[Any]:
        """Load this process's chunks while the workers load theirs; commit if all are valid."""
        pool, own = self._pool, self._own
        if pool is None or not self._shares:
            return self._ctx.load_ciphertexts(blobs, 0, expected)
        with pool.lock:
            for worker, start, stop in self._shares:
                pool.send(worker, ("stage", self._pool_id, start, expected, blobs[start:stop]))
            error: tuple[BaseException, BaseException | None] | None = None
            cts: list[Any] = []
            try:
                cts = self._ctx.load_ciphertexts(blobs[:own], 0, expected)
            except MalformedUpdateError as exc:
                error = (exc, exc.__cause__)
            except BaseException:
                self._settle(pool, ("unexpected", None))
                raise
            error = self._settle(pool, error)
        if error is not None:
            raise error[0] from error[1]
        return cts

    def _settle(self, pool: he_pool.WorkerPool, error: Any) -> Any:
        """Read every worker's verdict, then commit or abort; returns the first error.

        Every reply is read, even after an error, to keep the pipes in step; the
        first error in chunk order is the one reported.
        """
        replies = [pool.recv(worker) for worker, _, _ in self._shares]
        error = error or next((r for r in replies if r is not None), None)
        verdict = "commit" if error is None else "abort"
        for worker, _, _ in self._shares:
            pool.send(worker, (verdict, self._pool_id))
        return error

    def _dump_shared(self) -> list[bytes]:
        """Serialize the sum: this process's chunks, then each worker's, in order."""
        assert self._sum is not None
        pool = self._pool
        if pool is None or not self._shares:
            return [seal_bytes.dump(ct) for ct in self._sum]
        with pool.lock:
            for worker, _, _ in self._shares:
                pool.send(worker, ("result", self._pool_id))
            chunks = [seal_bytes.dump(ct) for ct in self._sum]
            for worker, _, _ in self._shares:
                chunks += pool.recv(worker)
        return chunks

    def _check_job_and_round(self, env: update_pb2.UpdateEnvelope) -> None:
        """The update answers this aggregation's job and round (when it has them)."""
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

    def _check_layout(self, layout: Layout) -> Layout:
        """The update's tensors are those of the round's first update."""
        if self._layout is not None and layout != self._layout:
            diff = _layout_diff(layout, self._layout)
            raise MalformedUpdateError(
                f"update's layout differs from the first update's: {diff}; the hospital "
                "runs another model version, discard this update"
            )
        return layout

    def _check_encoding(self, spec: FixedPoint) -> FixedPoint:
        """The update's fixed-point encoding is that of the round's first update."""
        if self._spec is not None and spec != self._spec:
            raise MalformedUpdateError(
                f"update uses fixed-point scale 2**-{spec.scale_bits} and bound "
                f"2**{spec.value_bound_bits}, the round's first update used 2**-"
                f"{self._spec.scale_bits} and 2**{self._spec.value_bound_bits}; run the same "
                "fedvault version and settings at every hospital"
            )
        return spec

    def _check_sample_weight(
        self, sample_weight: float, expected: float | None, spec: FixedPoint
    ) -> float:
        """Check the update's weight; returns the round's new total.

        The weight is valid, the one expected, and the round's total stays within
        what the encoding sums exactly.
        """
        weight = _check_weight(sample_weight, "sample_weight")
        if expected is not None and weight != expected:
            raise MalformedUpdateError(
                f"update's sample_weight {sample_weight!r} differs from its expected weight "
                f"{expected!r}; the hospital must weight its update by its sample count, "
                "discard this update"
            )
        if self._total_weight + weight > spec.weight_capacity:
            raise MalformedUpdateError(
                f"adding sample weight {weight:g} would bring the round's total to "
                f"{self._total_weight + weight:g}, beyond the {spec.weight_capacity:g} the "
                f"fixed-point encoding sums exactly at scale 2**-{spec.scale_bits}; the update "
                "was left out (lower scale_bits for consortia this large)"
            )
        return self._total_weight + weight

    def result(self) -> bytes:
        """The serialized envelope of the sum (sample_weight = total weight).

        Raises
        ------
        MalformedUpdateError
            If no update was added.
        """
        if self._sum is None or self._layout is None or self._spec is None:
            raise MalformedUpdateError(
                "no update was added, so there is no aggregate; wait for at least one "
                "valid reply before closing the round"
            )
        chunks = self._dump_shared()
        return _envelope(
            self._ctx,
            self._key_epoch,
            self._layout,
            chunks,
            self._total_weight,
            self._result_job,
            self._result_round,
            self._spec,
        )


#: Ciphertext chunks loaded (and held as SEAL objects, ~4 bytes of memory per
#: float32 byte) at once while decrypting: memory stays bounded by the window.
_DECRYPT_WINDOW = 64


def _decrypt(
    ctx: HeContext, data: bytes, key_epoch: int | None, *, average: bool
) -> tuple[dict[str, np.ndarray], float]:
    """Decrypt chunk by chunk into the output tensors, never holding a flat copy.

    The output is the average in the layout's dtypes, or the weighted sum in float64.
    """
    if not ctx.is_private:
        raise SecretKeyExposureError(
            "this context holds no secret key, so it cannot decrypt; decryption happens "
            "only at hospitals, with the secret context from the key ceremony"
        )
    env = parse_envelope(data)
    _check_key(ctx, env, key_epoch)
    layout = Layout.from_proto(env.layout)
    spec = _spec(ctx, env.scale_bits, env.value_bound_bits)
    weight = _check_weight(env.sample_weight, "sample_weight")
    decryptor, encoder = ctx.decryptor, ctx.encoder
    out = Scatter(layout, dtype=None if average else "float64")
    plain = sealapi.Plaintext()
    for start in range(0, len(env.chunks) or 1, _DECRYPT_WINDOW):
        for ct in _load_chunks(ctx, env, layout, start=start, stop=start + _DECRYPT_WINDOW):
            decryptor.decrypt(ct, plain)
            values = fixed_point.decode(np.asarray(encoder.decode_int64(plain)), spec=spec)
            out.write(values / weight if average else values)
    return out.result(), weight


def decrypt_update(
    ctx: HeContext, data: bytes, *, key_epoch: int | None = None
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
    return _decrypt(ctx, data, key_epoch, average=False)


def decrypt_average(
    ctx: HeContext, data: bytes, *, key_epoch: int | None = None
) -> dict[str, np.ndarray]:
    """Decrypt and divide by the total weight: the FedAvg model, in original dtypes.

    Raises the same errors as :func:`decrypt_update`.
    """
    return _decrypt(ctx, data, key_epoch, average=True)[0]
