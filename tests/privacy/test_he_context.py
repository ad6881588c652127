"""BFV parameters and contexts: security validation, fingerprints, key hygiene."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tenseal as ts

from fedvault.errors import (
    InvalidConfigError,
    MalformedUpdateError,
    SecretKeyExposureError,
)
from fedvault.privacy.he_context import HE_STANDARD_MAX_COEFF_BITS, HeContext, HeParams


@pytest.fixture(scope="module")
def ctx() -> HeContext:
    return HeContext.generate()


def test_standard_table_pinned() -> None:
    # HomomorphicEncryption.org standard, 128-bit classical security, ternary secret.
    assert dict(HE_STANDARD_MAX_COEFF_BITS) == {
        1024: 27,
        2048: 54,
        4096: 109,
        8192: 218,
        16384: 438,
        32768: 881,
    }


def test_default_params() -> None:
    params = HeParams()
    assert params.poly_modulus_degree == 4096
    assert params.coeff_mod_bit_sizes == (60, 49)
    assert sum(params.coeff_mod_bit_sizes) == HE_STANDARD_MAX_COEFF_BITS[4096]
    assert params.slots == 4096
    assert params.data_modulus_bits == 60
    # SEAL's batching prime: 47 bits, = 1 mod 2N, so signed 45-bit sums decode.
    t = params.plain_modulus
    assert t.bit_length() == 47 and t % (2 * 4096) == 1
    assert params.slot_bits == 45 and t // 2 >= 2**45


def test_params_list_normalised_to_tuple() -> None:
    params = HeParams(coeff_mod_bit_sizes=[60, 49])  # type: ignore[arg-type]
    assert params.coeff_mod_bit_sizes == (60, 49)
    assert hash(params) == hash(HeParams())


def test_params_over_security_budget_refused() -> None:
    with pytest.raises(InvalidConfigError) as info:
        HeParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60, 60, 60))
    msg = str(info.value)
    for needle in ("poly_modulus_degree=8192", "coeff_mod_bit_sizes", "240", "218", "128-bit"):
        assert needle in msg


def test_params_at_security_budget_accepted() -> None:
    params = HeParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 49, 49, 60))
    assert sum(params.coeff_mod_bit_sizes) == 218
    assert HeContext.generate(params).params == params


@pytest.mark.parametrize("degree", [6000, 8191, 512, 65536, 0, -8192])
def test_params_degree_not_in_table_refused(degree: int) -> None:
    with pytest.raises(InvalidConfigError, match="poly_modulus_degree"):
        HeParams(poly_modulus_degree=degree)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"coeff_mod_bit_sizes": (60,)}, "at least 2 primes"),
        ({"coeff_mod_bit_sizes": (61, 40, 60)}, "61-bit"),
        ({"coeff_mod_bit_sizes": (60, 19, 60)}, "19-bit"),
        ({"coeff_mod_bit_sizes": (60, 40.0, 60)}, "ints"),
        ({"plain_modulus_bits": 49}, "noise margin"),
        ({"coeff_mod_bit_sizes": (40, 40), "plain_modulus_bits": 30}, "noise margin"),
        ({"plain_modulus_bits": 16}, ">= 17"),
        ({"poly_modulus_degree": True}, "poly_modulus_degree"),
    ],
)
def test_params_invalid(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidConfigError, match=re.escape(needle)):
        HeParams(**kwargs)  # type: ignore[arg-type]


def test_generated_context_params(ctx: HeContext) -> None:
    assert ctx.is_private
    assert ctx.params == HeParams()
    assert not ctx.tenseal.has_galois_keys()


def test_fingerprint_same_for_secret_and_public_copy(ctx: HeContext) -> None:
    public = ctx.public()
    assert not public.is_private
    assert re.fullmatch(r"[0-9a-f]{64}", ctx.fingerprint)
    assert public.fingerprint == ctx.fingerprint
    # Also after a round trip through either serialization.
    assert HeContext.from_bytes(ctx.serialize_public()).fingerprint == ctx.fingerprint
    reloaded = HeContext.from_bytes(ctx.serialize_secret())
    assert reloaded.is_private
    assert reloaded.fingerprint == ctx.fingerprint
    assert reloaded.params == ctx.params


def test_fingerprint_differs_between_contexts(ctx: HeContext) -> None:
    other = HeContext.generate()
    assert other.fingerprint != ctx.fingerprint
    assert other.params == ctx.params  # same parameters, different keys


def test_public_serialization_holds_no_secret_key(ctx: HeContext, tmp_path: Path) -> None:
    public_bytes = ctx.serialize_public()
    loaded = ts.context_from(public_bytes)
    assert not loaded.is_private()
    assert loaded.has_public_key()
    # Sum-only aggregation: no relinearization or Galois keys travel either.
    assert not loaded.has_relin_keys()
    assert not loaded.has_galois_keys()

    key_file = tmp_path / "sk"
    ctx.tenseal.secret_key().data.save(str(key_file))
    secret_key_bytes = key_file.read_bytes()
    assert len(secret_key_bytes) > 1000
    # Positive control: the same bytes are found where the key *is* saved.
    assert secret_key_bytes in ctx.serialize_secret()
    assert secret_key_bytes not in public_bytes
    assert secret_key_bytes[100:164] not in public_bytes
    assert secret_key_bytes not in ctx.public().serialize_public()


def test_serialize_secret_of_public_context_refused(ctx: HeContext) -> None:
    with pytest.raises(SecretKeyExposureError, match="no secret key"):
        ctx.public().serialize_secret()


@pytest.mark.parametrize("garbage", [b"", b"garbage", b"\x00" * 64])
def test_from_bytes_garbage(garbage: bytes) -> None:
    with pytest.raises(MalformedUpdateError):
        HeContext.from_bytes(garbage)


def test_from_bytes_truncated(ctx: HeContext) -> None:
    data = ctx.serialize_public()
    with pytest.raises(MalformedUpdateError, match="corrupt or truncated"):
        HeContext.from_bytes(data[: len(data) // 2])


def test_from_bytes_refuses_ckks() -> None:
    ckks = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    with pytest.raises(MalformedUpdateError, match="CKKS scheme, not BFV"):
        HeContext.from_bytes(ckks.serialize())


def test_from_bytes_refuses_non_batching_plain_modulus() -> None:
    raw = ts.context(
        ts.SCHEME_TYPE.BFV, 4096, plain_modulus=2**46 + 15, coeff_mod_bit_sizes=[60, 49]
    )
    with pytest.raises(MalformedUpdateError, match="batching prime"):
        HeContext.from_bytes(raw.serialize())


def test_from_bytes_refuses_context_without_public_key() -> None:
    raw = ts.context(
        ts.SCHEME_TYPE.BFV,
        4096,
        plain_modulus=HeParams().plain_modulus,
        coeff_mod_bit_sizes=[60, 49],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    with pytest.raises(MalformedUpdateError, match="no public key"):
        HeContext.from_bytes(raw.serialize(save_secret_key=True))
