"""Encrypt -> aggregate -> decrypt of whole model updates, and every refusal.

Tolerance: BFV sums are exact, so the only error is the fixed-point rounding
of each summand, at most 1/2 unit of 2**-16: ``K * 2**-17`` on a weighted sum
of K updates (``SUM_ATOL``), ``K * 2**-17 / total_weight`` on the average;
float32 outputs add their own rounding (``rtol = 1e-6``).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedvault.errors import (
    FedvaultError,
    InvalidConfigError,
    KeyMismatchError,
    MalformedUpdateError,
    SecretKeyExposureError,
)
from fedvault.privacy import he_pool
from fedvault.privacy.he import (
    FORMAT_VERSION,
    Aggregator,
    decrypt_average,
    decrypt_update,
    encrypt_update,
    parse_envelope,
)
from fedvault.privacy.he_context import HeContext, HeParams
from fedvault.proto import update_pb2

SUM_ATOL = 3 * 2.0**-17  # three summands, 1/2 unit of 2**-16 each
SLOTS = 4096
WEIGHTS = (3.0, 50.0, 1234.0)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ctx() -> HeContext:
    return HeContext.generate()


@pytest.fixture(scope="module")
def pub(ctx: HeContext) -> HeContext:
    return ctx.public()


def _model(size: int, magnitude: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A scalar (shape ()), a 2-D float32 tensor and a float64 vector: ``size`` values."""
    model = {"scale": np.asarray(rng.standard_normal() * magnitude)}
    rest = size - 1
    if rest:
        half = rest // 2
        model["w"] = (rng.standard_normal((1, half)) * magnitude).astype(np.float32)
        model["b"] = rng.standard_normal(rest - half) * magnitude
    return model


def _weighted(updates: list[dict[str, np.ndarray]], weights: tuple[float, ...]) -> dict:
    return {
        name: sum(w * u[name].astype(np.float64) for u, w in zip(updates, weights, strict=True))
        for name in updates[0]
    }


def _check_round_trip(
    ctx: HeContext, pub: HeContext, size: int, magnitude: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    updates = [_model(size, magnitude, rng) for _ in WEIGHTS]
    agg = Aggregator(pub, key_epoch=2, job="j", server_round=5)
    for update, weight in zip(updates, WEIGHTS, strict=True):
        agg.add(encrypt_update(ctx, update, weight=weight, key_epoch=2, job="j", server_round=5))
    total = sum(WEIGHTS)
    assert agg.count == 3
    assert agg.total_weight == total
    result = agg.result()

    env = parse_envelope(result)
    assert len(env.chunks) == math.ceil(size / SLOTS)
    assert (env.key_epoch, env.job, env.server_round) == (2, "j", 5)

    sums, weight = decrypt_update(ctx, result, key_epoch=2)
    assert weight == total
    expected_sum = _weighted(updates, WEIGHTS)
    for name, value in sums.items():
        assert value.dtype == np.float64
        np.testing.assert_allclose(value, expected_sum[name], rtol=0, atol=SUM_ATOL)

    avg = decrypt_average(ctx, result, key_epoch=2)
    assert list(avg) == list(updates[0])
    for name, original in updates[0].items():
        assert avg[name].dtype == original.dtype, name
        assert avg[name].shape == original.shape, name
        expected = expected_sum[name] / total
        np.testing.assert_allclose(avg[name], expected, rtol=1e-6, atol=SUM_ATOL / total)


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 50.0])
@pytest.mark.parametrize("size", [1, SLOTS - 1, SLOTS, SLOTS + 1])
def test_aggregate_average_matches_numpy(
    ctx: HeContext, pub: HeContext, size: int, magnitude: float
) -> None:
    _check_round_trip(ctx, pub, size, magnitude, seed=size)


def test_million_value_layer(ctx: HeContext, pub: HeContext) -> None:
    rng = np.random.default_rng(7)
    weights = WEIGHTS
    updates = [{"big": rng.standard_normal((1000, 1000)).astype(np.float32)} for _ in weights]
    agg = Aggregator(pub)
    for update, weight in zip(updates, weights, strict=True):
        agg.add(encrypt_update(ctx, update, weight=weight))
    result = agg.result()
    assert len(parse_envelope(result).chunks) == math.ceil(10**6 / SLOTS) == 245
    avg = decrypt_average(ctx, result)["big"]
    assert avg.dtype == np.float32 and avg.shape == (1000, 1000)
    expected = _weighted(updates, weights)["big"] / sum(weights)
    np.testing.assert_allclose(avg, expected, rtol=1e-6, atol=SUM_ATOL / sum(weights))


def test_loader_threads_do_not_change_the_sum(ctx: HeContext, pub: HeContext) -> None:
    rng = np.random.default_rng(11)
    updates = [encrypt_update(ctx, _model(3 * SLOTS + 5, 1.0, rng), weight=w) for w in WEIGHTS]
    results = []
    for threads in (None, 1, 3):
        agg = Aggregator(pub, loader_threads=threads)
        for data in updates:
            agg.add(data)
        results.append(agg.result())
    assert results[0] == results[1] == results[2]  # exact: chunk order is kept
    with pytest.raises(InvalidConfigError, match="loader_threads=0 must be >= 1"):
        Aggregator(pub, loader_threads=0)


def test_single_update_decrypts_to_itself(ctx: HeContext) -> None:
    update = {"x": np.linspace(-1.0, 1.0, 10)}
    data = encrypt_update(ctx, update, weight=4.0)
    sums, weight = decrypt_update(ctx, data)
    assert weight == 4.0
    np.testing.assert_allclose(sums["x"], 4.0 * update["x"], rtol=0, atol=SUM_ATOL)
    np.testing.assert_allclose(decrypt_average(ctx, data)["x"], update["x"], atol=SUM_ATOL)


def test_result_carries_first_updates_job_and_round(ctx: HeContext, pub: HeContext) -> None:
    agg = Aggregator(pub, key_epoch=6)
    agg.add(
        encrypt_update(ctx, {"w": np.ones(2)}, weight=1.0, key_epoch=6, job="s", server_round=4)
    )
    env = parse_envelope(agg.result())
    assert (env.job, env.server_round, env.key_epoch, env.sample_weight) == ("s", 4, 6, 1.0)
    assert env.context_fingerprint == pub.fingerprint


def test_public_context_encrypts(ctx: HeContext, pub: HeContext) -> None:
    # The coordinator encrypts the initial model with the public key only.
    model = {"w": np.array([0.25, -3.0, 255.0])}
    data = encrypt_update(pub, model, weight=1.0, server_round=0)
    np.testing.assert_allclose(decrypt_average(ctx, data)["w"], model["w"], atol=SUM_ATOL)


def test_aggregator_refuses_secret_context(ctx: HeContext) -> None:
    with pytest.raises(SecretKeyExposureError, match=r"ctx\.public\(\)"):
        Aggregator(ctx)


def test_decrypt_with_public_context_refused(ctx: HeContext, pub: HeContext) -> None:
    data = encrypt_update(ctx, {"w": np.ones(3)}, weight=1.0)
    with pytest.raises(SecretKeyExposureError, match="this context holds no secret key"):
        decrypt_update(pub, data)
    with pytest.raises(SecretKeyExposureError):
        decrypt_average(pub, data)


def test_decrypt_wrong_key_or_epoch(ctx: HeContext) -> None:
    data = encrypt_update(ctx, {"w": np.ones(3)}, weight=1.0, key_epoch=4)
    with pytest.raises(KeyMismatchError):
        decrypt_update(HeContext.generate(), data)
    with pytest.raises(KeyMismatchError, match="epoch 4, expected epoch 5"):
        decrypt_average(ctx, data, key_epoch=5)


def test_result_without_updates(pub: HeContext) -> None:
    with pytest.raises(MalformedUpdateError, match="no update was added"):
        Aggregator(pub).result()


# --- refusals: each leaves the running sum untouched -------------------------

BASE = {"a": np.linspace(-2.0, 2.0, SLOTS + 10), "s": np.asarray(0.5, dtype=np.float32)}
BASE_WEIGHT = 7.0


def _tamper(data: bytes, edit: Callable[[update_pb2.UpdateEnvelope], None]) -> bytes:
    env = parse_envelope(data)
    edit(env)
    return env.SerializeToString()


def _set(field: str, value: object) -> Callable[[update_pb2.UpdateEnvelope], None]:
    return lambda env: setattr(env, field, value)


def _replace_chunk(index: int, blob: bytes) -> Callable[[update_pb2.UpdateEnvelope], None]:
    def edit(env: update_pb2.UpdateEnvelope) -> None:
        env.chunks[index] = blob

    return edit


def _garble_middle(blob: bytes) -> bytes:
    """Overwrite coefficients with 0xff..: no longer residues mod q, which SEAL checks.

    (Coefficients overwritten with other residues would still form a valid
    ciphertext of some other plaintext: no receiver can tell, exactly as it
    cannot tell a hospital that encrypted garbage. TLS protects transit.)
    """
    garbled = bytearray(blob)
    mid = len(garbled) // 2
    garbled[mid : mid + 64] = b"\xff" * 64
    return bytes(garbled)


UNPARSABLE = "cannot parse the update envelope"
CHUNK_UNPARSABLE = "chunk 0 of 2 cannot be parsed"


def _bad_updates(ctx: HeContext) -> dict[str, tuple[bytes, type[Exception], str]]:
    """Name -> (update, expected error, expected message fragment)."""
    good = encrypt_update(ctx, BASE, weight=BASE_WEIGHT)
    chunk0 = parse_envelope(good).chunks[0]
    other_params = HeContext.generate(
        HeParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60))
    )
    foreign = parse_envelope(encrypt_update(other_params, BASE, weight=1.0)).chunks[0]
    noise = np.random.default_rng(3).bytes(len(chunk0))
    other_shape = dict(BASE, a=BASE["a"].reshape(1, -1))
    renamed = {"z": BASE["a"], "s": BASE["s"]}
    mal, key = MalformedUpdateError, KeyMismatchError
    return {
        "wrong key": (encrypt_update(HeContext.generate(), BASE, weight=1.0), key, "ceremony"),
        "wrong epoch": (
            encrypt_update(ctx, BASE, weight=1.0, key_epoch=1),
            key,
            "epoch 1, expected epoch 0",
        ),
        "truncated envelope": (good[: len(good) // 3], mal, UNPARSABLE),
        "garbage": (b"\x07garbage" * 10, mal, UNPARSABLE),
        "empty": (b"", mal, "format_version=0"),
        "truncated chunk": (_tamper(good, _replace_chunk(0, chunk0[:-100])), mal, CHUNK_UNPARSABLE),
        "garbled chunk": (
            _tamper(good, _replace_chunk(0, _garble_middle(chunk0))),
            mal,
            CHUNK_UNPARSABLE,
        ),
        "random chunk": (_tamper(good, _replace_chunk(0, noise)), mal, CHUNK_UNPARSABLE),
        "empty chunk": (
            _tamper(good, _replace_chunk(1, b"")),
            mal,
            "chunk 1 of 2 cannot be parsed",
        ),
        "chunk of other parameters": (
            _tamper(good, _replace_chunk(0, foreign)),
            mal,
            CHUNK_UNPARSABLE,
        ),
        "oversized chunk": (
            _tamper(good, _replace_chunk(0, chunk0 * 3)),
            mal,
            "more than a ciphertext",
        ),
        "scale bits": (_tamper(good, _set("scale_bits", 20)), mal, "fixed-point scale 2**-20"),
        "bound bits": (_tamper(good, _set("value_bound_bits", 40)), mal, "no room"),
        "weight capacity": (_tamper(good, _set("sample_weight", 3e6)), mal, "sums exactly"),
        "missing chunk": (_tamper(good, lambda env: env.chunks.pop()), mal, "has 1 ciphertext"),
        "extra chunk": (
            _tamper(good, lambda env: env.chunks.append(chunk0)),
            mal,
            "has 3 ciphertext",
        ),
        "layout shape": (
            encrypt_update(ctx, other_shape, weight=1.0),
            mal,
            "'a' (1, 4106) float64, expected 'a' (4106,) float64",
        ),
        "layout names": (encrypt_update(ctx, renamed, weight=1.0), mal, "is 'z'"),
        "zero weight": (_tamper(good, _set("sample_weight", 0.0)), mal, "got 0.0"),
        "negative weight": (_tamper(good, _set("sample_weight", -2.0)), mal, "got -2.0"),
        "nan weight": (_tamper(good, _set("sample_weight", math.nan)), mal, "got nan"),
        "inf weight": (_tamper(good, _set("sample_weight", math.inf)), mal, "got inf"),
        "format version": (_tamper(good, _set("format_version", 1)), mal, "format_version=1"),
        "scheme": (_tamper(good, _set("scheme", "ckks")), mal, "scheme 'ckks'"),
        "job": (_tamper(good, _set("job", "other")), mal, "job 'other'"),
        "round": (_tamper(good, _set("server_round", 3)), mal, "stale"),
    }


def test_rejected_updates_leave_sum_untouched(ctx: HeContext, pub: HeContext) -> None:
    bad = _bad_updates(ctx)
    agg = Aggregator(pub, job="", server_round=0)
    agg.add(encrypt_update(ctx, BASE, weight=BASE_WEIGHT))
    job_agg = Aggregator(pub, job="j")
    for name, (data, error, needle) in bad.items():
        target = job_agg if name == "job" else agg
        with pytest.raises(error) as info:
            target.add(data)
        assert info.type is error, name
        assert needle in str(info.value), (name, str(info.value))
    assert (agg.count, agg.total_weight) == (1, BASE_WEIGHT)

    # Nothing rejected touched the sum, and it still accepts good updates.
    agg.add(encrypt_update(ctx, BASE, weight=1.0))
    avg = decrypt_average(ctx, agg.result())
    for key, value in BASE.items():
        np.testing.assert_allclose(avg[key], value, rtol=1e-6, atol=SUM_ATOL / 8.0)
    sums, weight = decrypt_update(ctx, agg.result())
    assert weight == BASE_WEIGHT + 1.0
    np.testing.assert_allclose(sums["a"], 8.0 * BASE["a"], rtol=0, atol=SUM_ATOL)


# --- worker processes: the same sum, the same refusals -------------------------

#: Chunks enough that an update is shared with a worker process (16 a process).
SHARED = 50 * SLOTS


def test_worker_processes_give_the_same_bytes(ctx: HeContext, pub: HeContext) -> None:
    rng = np.random.default_rng(12)
    updates = [encrypt_update(ctx, _model(SHARED - 7, 1.0, rng), weight=w) for w in WEIGHTS]
    chunk = parse_envelope(updates[0]).chunks[0]
    results = []
    for processes in (1, 2, 3):
        agg = Aggregator(pub, processes=processes)
        assert len(agg._shares) == 0
        for i, data in enumerate(updates):
            agg.add(data)
            if i == 0:
                assert len(agg._shares) == processes - 1
                # A bad chunk in any process's range is refused with its index,
                # and leaves every process's part of the sum untouched.
                for index in (3, 30, 48):
                    bad = _tamper(data, _replace_chunk(index, _garble_middle(chunk)))
                    with pytest.raises(MalformedUpdateError, match=f"chunk {index} of 50 cannot"):
                        agg.add(bad)
        results.append(agg.result())
    assert results[0] == results[1] == results[2]  # byte for byte
    sums, total = decrypt_update(ctx, results[2])
    assert total == sum(WEIGHTS)
    rng = np.random.default_rng(12)
    expected = _weighted([_model(SHARED - 7, 1.0, rng) for _ in WEIGHTS], WEIGHTS)
    for name, value in expected.items():
        np.testing.assert_allclose(sums[name], value, rtol=0, atol=SUM_ATOL)
    with pytest.raises(InvalidConfigError, match="processes=0 must be >= 1"):
        Aggregator(pub, processes=0)


def test_dead_worker_is_reported(ctx: HeContext, pub: HeContext) -> None:
    data = encrypt_update(ctx, _model(SHARED, 1.0, np.random.default_rng(13)), weight=2.0)
    agg = Aggregator(pub, processes=2)
    agg.add(data)
    assert agg._pool is not None
    worker = agg._pool.workers[0].process
    worker.kill()
    worker.wait(timeout=30)
    with pytest.raises(FedvaultError, match="died"):
        agg.add(data)
    # The next aggregation starts a fresh pool and works.
    fresh = Aggregator(pub, processes=2)
    fresh.add(data)
    assert fresh._pool is not None and fresh._pool is not agg._pool
    assert decrypt_update(ctx, fresh.result())[1] == 2.0


def test_shares_follow_the_first_accepted_update(ctx: HeContext, pub: HeContext) -> None:
    rng = np.random.default_rng(15)
    small = encrypt_update(ctx, _model(SHARED, 1.0, rng), weight=1.0)
    chunk = parse_envelope(small).chunks[0]
    big_model = _model(SHARED + 20 * SLOTS, 1.0, rng)
    big = encrypt_update(ctx, big_model, weight=2.0)
    agg = Aggregator(pub, processes=2)
    with pytest.raises(MalformedUpdateError, match="chunk 40 of 50 cannot"):
        agg.add(_tamper(small, _replace_chunk(40, _garble_middle(chunk))))
    agg.add(big)  # 70 chunks: a refused first update fixes nothing
    sums, weight = decrypt_update(ctx, agg.result())
    assert weight == 2.0 and len(agg._shares) == 1
    for name, value in big_model.items():
        np.testing.assert_allclose(sums[name], 2.0 * value, rtol=0, atol=SUM_ATOL)


def test_workers_that_cannot_start_leave_the_sum_here(
    ctx: HeContext, pub: HeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encrypt_update(ctx, _model(SHARED, 1.0, np.random.default_rng(14)), weight=3.0)
    reference = Aggregator(pub, processes=1)
    reference.add(data)
    monkeypatch.setattr(he_pool, "_pool", None)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a worker that exits at once
    agg = Aggregator(pub, processes=2)
    agg.add(data)
    assert agg._pool is None
    assert agg.result() == reference.result()


def test_wrong_key_message_names_expected_key(ctx: HeContext, pub: HeContext) -> None:
    agg = Aggregator(pub, key_epoch=3)
    other = encrypt_update(HeContext.generate(), BASE, weight=1.0, key_epoch=3)
    with pytest.raises(KeyMismatchError) as info:
        agg.add(other)
    assert pub.fingerprint[:16] in str(info.value)
    assert "key ceremony" in str(info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_encrypt_refuses_non_finite(ctx: HeContext, value: float) -> None:
    arr = np.ones(5)
    arr[3] = value
    with pytest.raises(MalformedUpdateError, match="'fc'"):
        encrypt_update(ctx, {"fc": arr}, weight=1.0)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.inf, math.nan, True])
def test_encrypt_refuses_bad_weight(ctx: HeContext, weight: float) -> None:
    with pytest.raises(MalformedUpdateError, match="weight"):
        encrypt_update(ctx, {"w": np.ones(2)}, weight=weight)


def test_encrypt_refuses_out_of_range_values_and_weights(ctx: HeContext) -> None:
    # Values below 2**8 and total weight up to 2**21 sum exactly in 45-bit slots.
    encrypt_update(ctx, {"w": np.array([255.99])}, weight=2.0**21)
    with pytest.raises(MalformedUpdateError, match="beyond the ±256"):
        encrypt_update(ctx, {"w": np.array([-256.0])}, weight=1.0)
    with pytest.raises(MalformedUpdateError, match=r"exceeds the 2\.09715e"):
        encrypt_update(ctx, {"w": np.array([1.0])}, weight=2.0**21 + 1)


def test_sum_at_capacity_is_exact(ctx: HeContext, pub: HeContext) -> None:
    # The largest values at the largest total weight: the sum's integers reach
    # 2**45 - 2**21 and still decode exactly; one more record is refused.
    top = {"w": np.array([255.99, -255.99, 1e-3])}
    agg = Aggregator(pub)
    for _ in range(4):
        agg.add(encrypt_update(ctx, top, weight=2.0**19))
    with pytest.raises(MalformedUpdateError, match="left out"):
        agg.add(encrypt_update(ctx, top, weight=1.0))
    sums, weight = decrypt_update(ctx, agg.result())
    assert weight == 2.0**21
    np.testing.assert_allclose(sums["w"], 2.0**21 * top["w"], rtol=0, atol=4 * 2.0**-17)


def test_encrypt_refuses_empty_and_bad_ids(ctx: HeContext) -> None:
    with pytest.raises(MalformedUpdateError, match="no values"):
        encrypt_update(ctx, {}, weight=1.0)
    with pytest.raises(InvalidConfigError, match="key_epoch"):
        encrypt_update(ctx, {"w": np.ones(2)}, weight=1.0, key_epoch=-1)
    with pytest.raises(InvalidConfigError, match="server_round"):
        encrypt_update(ctx, {"w": np.ones(2)}, weight=1.0, server_round=2**32)


def test_envelope_fields(ctx: HeContext) -> None:
    data = encrypt_update(ctx, BASE, weight=2.5, key_epoch=9, job="study", server_round=12)
    env = parse_envelope(data)
    assert env.format_version == FORMAT_VERSION == 2
    assert env.scheme == "bfv-fixed"
    assert (env.scale_bits, env.value_bound_bits) == (16, 8)
    assert env.context_fingerprint == ctx.fingerprint
    assert (env.key_epoch, env.job, env.server_round, env.sample_weight) == (9, "study", 12, 2.5)
    assert [t.name for t in env.layout.tensors] == ["a", "s"]
    assert list(env.layout.tensors[0].shape) == [SLOTS + 10]
    assert env.layout.tensors[1].dtype == "float32"


# --- generated protobuf code ---------------------------------------------------


def _code_lines(text: str) -> list[str]:
    """Drop comments and the protobuf runtime version check (they vary by protoc)."""
    lines, skipping = [], False
    for line in text.splitlines():
        if line.startswith("_runtime_version.ValidateProtobufRuntimeVersion("):
            skipping = True
        if not skipping and not line.lstrip().startswith("#"):
            lines.append(line)
        if skipping and line.strip() == ")":
            skipping = False
    return lines


def test_generated_proto_in_sync(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(REPO / "proto"),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(REPO / "proto" / "update.proto"),
        ],
        check=True,
        capture_output=True,
    )
    for name in ("update_pb2.py", "update_pb2.pyi"):
        fresh = _code_lines((tmp_path / name).read_text())
        committed = _code_lines((REPO / "proto" / name).read_text())
        assert len(fresh) > 10
        assert fresh == committed, f"proto/{name} is stale: regenerate it (see proto/README.md)"
