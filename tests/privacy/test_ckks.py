"""CKKS parameters and contexts: security validation, fingerprints, key hygiene."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tenseal as ts

from fedvault.privacy.ckks import HE_STANDARD_MAX_COEFF_BITS, CkksContext, CkksParams
from fedvault.privacy.errors import (
    InvalidConfigError,
    MalformedUpdateError,
    SecretKeyExposureError,
)


@pytest.fixture(scope="module")
def ctx() -> CkksContext:
    return CkksContext.generate()


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
    params = CkksParams()
    assert params.poly_modulus_degree == 8192
    assert params.coeff_mod_bit_sizes == (60, 40, 60)
    assert params.slots == 4096
    assert params.data_modulus_bits == 100
    assert params.max_abs_value == 2.0**59


def test_params_list_normalised_to_tuple() -> None:
    params = CkksParams(coeff_mod_bit_sizes=[60, 40, 60])  # type: ignore[arg-type]
    assert params.coeff_mod_bit_sizes == (60, 40, 60)
    assert hash(params) == hash(CkksParams())


def test_params_over_security_budget_refused() -> None:
    with pytest.raises(InvalidConfigError) as info:
        CkksParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60, 60, 60))
    msg = str(info.value)
    for needle in ("poly_modulus_degree=8192", "coeff_mod_bit_sizes", "240", "218", "128-bit"):
        assert needle in msg


def test_params_at_security_budget_accepted() -> None:
    params = CkksParams(coeff_mod_bit_sizes=(60, 49, 49, 60))
    assert sum(params.coeff_mod_bit_sizes) == 218
    assert CkksContext.generate(params).params == params


@pytest.mark.parametrize("degree", [6000, 8191, 512, 65536, 0, -8192])
def test_params_degree_not_in_table_refused(degree: int) -> None:
    with pytest.raises(InvalidConfigError, match="poly_modulus_degree"):
        CkksParams(poly_modulus_degree=degree)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"coeff_mod_bit_sizes": (60,)}, "at least 2 primes"),
        ({"coeff_mod_bit_sizes": (61, 40, 60)}, "61-bit"),
        ({"coeff_mod_bit_sizes": (60, 19, 60)}, "19-bit"),
        ({"coeff_mod_bit_sizes": (60, 40.0, 60)}, "ints"),
        ({"global_scale_bits": 60}, "smaller than the first prime"),
        ({"coeff_mod_bit_sizes": (30, 30), "global_scale_bits": 30}, "smaller than"),
        ({"global_scale_bits": 0}, "positive"),
        ({"poly_modulus_degree": True}, "poly_modulus_degree"),
    ],
)
def test_params_invalid(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidConfigError, match=re.escape(needle)):
        CkksParams(**kwargs)  # type: ignore[arg-type]


def test_generated_context_params(ctx: CkksContext) -> None:
    assert ctx.is_private
    assert ctx.params == CkksParams()
    assert ctx.tenseal.global_scale == 2.0**40
    assert not ctx.tenseal.has_galois_keys()


def test_fingerprint_same_for_secret_and_public_copy(ctx: CkksContext) -> None:
    public = ctx.public()
    assert not public.is_private
    assert re.fullmatch(r"[0-9a-f]{64}", ctx.fingerprint)
    assert public.fingerprint == ctx.fingerprint
    # Also after a round trip through either serialization.
    assert CkksContext.from_bytes(ctx.serialize_public()).fingerprint == ctx.fingerprint
    reloaded = CkksContext.from_bytes(ctx.serialize_secret())
    assert reloaded.is_private
    assert reloaded.fingerprint == ctx.fingerprint
    assert reloaded.params == ctx.params


def test_fingerprint_differs_between_contexts(ctx: CkksContext) -> None:
    other = CkksContext.generate()
    assert other.fingerprint != ctx.fingerprint
    assert other.params == ctx.params  # same parameters, different keys


def test_public_serialization_holds_no_secret_key(ctx: CkksContext, tmp_path: Path) -> None:
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


def test_serialize_secret_of_public_context_refused(ctx: CkksContext) -> None:
    with pytest.raises(SecretKeyExposureError, match="no secret key"):
        ctx.public().serialize_secret()


@pytest.mark.parametrize("garbage", [b"", b"garbage", b"\x00" * 64])
def test_from_bytes_garbage(garbage: bytes) -> None:
    with pytest.raises(MalformedUpdateError):
        CkksContext.from_bytes(garbage)


def test_from_bytes_truncated(ctx: CkksContext) -> None:
    data = ctx.serialize_public()
    with pytest.raises(MalformedUpdateError, match="corrupt or truncated"):
        CkksContext.from_bytes(data[: len(data) // 2])


def test_from_bytes_refuses_bfv() -> None:
    bfv = ts.context(ts.SCHEME_TYPE.BFV, 4096, plain_modulus=1032193)
    with pytest.raises(MalformedUpdateError, match="BFV"):
        CkksContext.from_bytes(bfv.serialize())


def test_from_bytes_refuses_odd_scale() -> None:
    raw = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    raw.global_scale = 3.0 * 2**30
    with pytest.raises(MalformedUpdateError, match="power of two"):
        CkksContext.from_bytes(raw.serialize())


def test_from_bytes_refuses_context_without_public_key() -> None:
    raw = ts.context(
        ts.SCHEME_TYPE.CKKS,
        8192,
        coeff_mod_bit_sizes=[60, 40, 60],
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    raw.global_scale = 2.0**40
    with pytest.raises(MalformedUpdateError, match="no public key"):
        CkksContext.from_bytes(raw.serialize(save_secret_key=True))
