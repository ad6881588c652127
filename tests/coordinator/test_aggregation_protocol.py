"""One seam for aggregation: both aggregators behind one protocol, one mode object.

:class:`PlainFedAvg` and the HE :class:`Aggregator` both satisfy
:class:`UpdateAggregator`, and going through it (or through the job's
:class:`AggregationMode`) gives the very aggregate that calling them directly
does. :func:`aggregation_mode` is where ``he`` and ``none`` part ways.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedvault.config import SecureAggregation
from fedvault.coordinator.aggregation import (
    AggregationMode,
    ModelLayout,
    PlainFedAvg,
    UpdateAggregator,
    _check_encrypted,
    _check_plaintext,
    aggregation_mode,
)
from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.messages import ModelPayload
from fedvault.privacy.he import Aggregator, decrypt_average, encrypt_update, parse_envelope
from fedvault.privacy.he_context import HeContext

WEIGHTS = (3.0, 50.0, 1234.0)
JOB, ROUND, EPOCH = "seam", 4, 2
# A reason must say what to do, not only what is wrong.
ACTION = re.compile(r"discard|must|check|give it only|run the same", re.IGNORECASE)


@pytest.fixture(scope="module")
def ctx() -> HeContext:
    return HeContext.generate()


@pytest.fixture(scope="module")
def pub(ctx: HeContext) -> HeContext:
    return ctx.public()


def _updates() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {"w": rng.standard_normal((20, 30)).astype(np.float32), "b": rng.standard_normal(9)}
        for _ in WEIGHTS
    ]


def _envelopes(ctx: HeContext) -> list[bytes]:
    return [
        encrypt_update(ctx, u, weight=w, key_epoch=EPOCH, job=JOB, server_round=ROUND)
        for u, w in zip(_updates(), WEIGHTS, strict=True)
    ]


def test_the_mode_decides_he_or_none_in_one_place() -> None:
    he, none = aggregation_mode(SecureAggregation.HE), aggregation_mode(SecureAggregation.NONE)
    assert isinstance(he, AggregationMode) and isinstance(none, AggregationMode)
    assert (he.encrypted, none.encrypted) == (True, False)
    assert SecureAggregation.HE.encrypted and not SecureAggregation.NONE.encrypted


def test_both_aggregators_satisfy_the_protocol(pub: HeContext) -> None:
    plain = aggregation_mode(SecureAggregation.NONE).aggregator(
        None, key_epoch=EPOCH, job=JOB, server_round=ROUND
    )
    he = aggregation_mode(SecureAggregation.HE).aggregator(
        pub, key_epoch=EPOCH, job=JOB, server_round=ROUND
    )
    assert isinstance(plain, PlainFedAvg) and isinstance(he, Aggregator)
    for agg in (plain, he, PlainFedAvg(), Aggregator(pub)):
        assert isinstance(agg, UpdateAggregator)
        assert (agg.count, agg.total_weight) == (0, 0.0)


def test_plain_through_the_seam_is_the_same_average() -> None:
    direct, seam = PlainFedAvg(), aggregation_mode(SecureAggregation.NONE)
    agg: UpdateAggregator[object, dict[str, np.ndarray]] = seam.aggregator(
        None, key_epoch=0, job=JOB, server_round=ROUND
    )
    for update, weight in zip(_updates(), WEIGHTS, strict=True):
        direct.add(update, weight=weight)
        parsed = seam.parse(ModelPayload(arrays=update))
        assert parsed.weight is None and parsed.layout == ModelLayout.of_arrays(update)
        agg.add(parsed.data, weight=weight)
    assert (agg.count, agg.total_weight) == (direct.count, direct.total_weight) == (3, sum(WEIGHTS))
    got, want = seam.payload(agg.result()), direct.result()
    assert got.envelope is None and got.arrays is not None and list(got.arrays) == list(want)
    for name, value in want.items():
        assert got.arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(got.arrays[name], value)


def test_he_through_the_seam_is_byte_identical(ctx: HeContext, pub: HeContext) -> None:
    envelopes = _envelopes(ctx)
    direct = Aggregator(pub, key_epoch=EPOCH, job=JOB, server_round=ROUND)
    seam = aggregation_mode(SecureAggregation.HE)
    agg = seam.aggregator(pub, key_epoch=EPOCH, job=JOB, server_round=ROUND)
    for envelope, weight in zip(envelopes, WEIGHTS, strict=True):
        direct.add(envelope)
        parsed = seam.parse(ModelPayload(envelope=envelope))
        assert parsed.weight == weight
        assert parsed.layout == ModelLayout.of_envelope(parse_envelope(envelope))
        agg.add(parsed.data, weight=weight)
    assert (agg.count, agg.total_weight) == (direct.count, direct.total_weight) == (3, sum(WEIGHTS))
    payload = seam.payload(agg.result())
    assert payload.arrays is None and payload.envelope == direct.result()


def test_he_aggregator_refuses_a_weight_other_than_the_envelopes(
    ctx: HeContext, pub: HeContext
) -> None:
    first, second, _ = _envelopes(ctx)
    agg = Aggregator(pub, key_epoch=EPOCH, job=JOB, server_round=ROUND)
    agg.add(first, weight=WEIGHTS[0])
    before = agg.result()
    with pytest.raises(MalformedUpdateError, match="sample count") as err:
        agg.add(second, weight=WEIGHTS[1] + 1)
    assert ACTION.search(str(err.value)), err.value
    assert (agg.count, agg.total_weight, agg.result()) == (1, WEIGHTS[0], before)


def test_initial_model_travels_as_the_mode_sends_it(ctx: HeContext, pub: HeContext) -> None:
    weights = _updates()[0]
    plain = aggregation_mode(SecureAggregation.NONE).initial_model(
        weights, None, key_epoch=EPOCH, job=JOB
    )
    assert plain == ModelPayload(arrays=weights)
    he = aggregation_mode(SecureAggregation.HE).initial_model(
        weights, pub, key_epoch=EPOCH, job=JOB
    )
    assert he.arrays is None and he.envelope is not None
    env = parse_envelope(he.envelope)
    assert (env.key_epoch, env.job, env.server_round, env.sample_weight) == (EPOCH, JOB, 0, 1.0)
    for name, value in decrypt_average(ctx, he.envelope).items():
        np.testing.assert_allclose(value, weights[name], atol=2.0**-15)


@pytest.mark.parametrize("private", [False, True])
def test_he_mode_needs_the_public_context_only(ctx: HeContext, private: bool) -> None:
    mode = aggregation_mode(SecureAggregation.HE)
    given = ctx if private else None
    for call in (
        lambda: mode.check_context(given),
        lambda: mode.aggregator(given, key_epoch=0, job=JOB, server_round=ROUND),
        lambda: mode.initial_model({"w": np.ones(2)}, given, key_epoch=0, job=JOB),
    ):
        with pytest.raises(InvalidConfigError, match=r"public HE context|only the public"):
            call()
    aggregation_mode(SecureAggregation.NONE).check_context(None)  # plaintext needs no key


# --- the payload-kind checks, one bad input each ----------------------------------


def test_check_encrypted_refuses_plaintext_arrays() -> None:
    with pytest.raises(MalformedUpdateError, match="plaintext update in an encrypted job") as err:
        _check_encrypted(ModelPayload(arrays={"w": np.ones(2)}))
    assert ACTION.search(str(err.value)), err.value
    assert _check_encrypted(ModelPayload(envelope=b"x")) == b"x"


def test_check_plaintext_refuses_an_envelope() -> None:
    with pytest.raises(MalformedUpdateError, match="encrypted update in a plaintext job") as err:
        _check_plaintext(ModelPayload(envelope=b"x"))
    assert ACTION.search(str(err.value)), err.value
    arrays = {"w": np.ones(2)}
    assert _check_plaintext(ModelPayload(arrays=arrays)) is arrays
