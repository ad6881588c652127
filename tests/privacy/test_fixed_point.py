"""Fixed-point encoding and the exactness claims of the BFV update path, numerically."""

from __future__ import annotations

import numpy as np
import pytest

from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.privacy import fixed_point, seal_bytes
from fedvault.privacy.fixed_point import FixedPoint
from fedvault.privacy.he import Aggregator, decrypt_average, encrypt_update, parse_envelope
from fedvault.privacy.he_context import HeContext


@pytest.fixture(scope="module")
def ctx() -> HeContext:
    return HeContext.generate()


def test_defaults_and_bounds() -> None:
    spec = FixedPoint()
    assert (spec.scale_bits, spec.value_bound_bits, spec.slot_bits) == (16, 8, 45)
    assert spec.value_bound == 256.0
    assert spec.weight_capacity == 2.0**21
    assert spec.max_error == 2.0**-17
    with pytest.raises(InvalidConfigError, match="no room"):
        FixedPoint(scale_bits=30, value_bound_bits=15)
    with pytest.raises(InvalidConfigError, match="non-negative"):
        FixedPoint(scale_bits=-1)


def test_rounding_error_is_at_most_half_a_unit() -> None:
    spec = FixedPoint()
    x = np.random.default_rng(0).uniform(-255.9, 255.9, 200_000)
    ints = fixed_point.encode(x.copy(), weight=37.0, spec=spec)
    err = np.abs(fixed_point.decode(ints, spec=spec) / 37.0 - x)
    assert err.max() <= 2.0**-17 / 37.0
    assert err.max() > 2.0**-17 / 37.0 / 2  # the bound is tight, not loose


@pytest.mark.parametrize("bad", [256.0, -256.0, np.nan, np.inf])
def test_out_of_range_refused(bad: float) -> None:
    with pytest.raises(MalformedUpdateError, match="beyond the ±256"):
        fixed_point.encode(np.array([0.0, bad]), weight=1.0, spec=FixedPoint())


def test_average_error_bound_holds_for_many_hospitals(ctx: HeContext) -> None:
    """K hospitals: |decrypted average - exact| <= K / (2W) * 2**-F <= 2**-(F+1)."""
    rng = np.random.default_rng(1)
    weights = rng.integers(1, 500, size=40).astype(float)
    updates = [rng.uniform(-200, 200, 5000) for _ in weights]
    pub = ctx.public()
    agg = Aggregator(pub)
    for u, w in zip(updates, weights, strict=True):
        agg.add(encrypt_update(ctx, {"u": u}, weight=w))
    avg = decrypt_average(ctx, agg.result())["u"]
    exact = sum(w * u for u, w in zip(updates, weights, strict=True)) / weights.sum()
    bound = len(weights) / (2 * weights.sum()) * 2.0**-16
    assert np.abs(avg - exact).max() <= bound * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize(("example", "samples"), [("breast-cancer", 190), ("digits", 450)])
def test_error_far_below_one_percent_of_dp_noise(example: str, samples: int) -> None:
    """The precision claim of the module docstring, for each shipped example.

    One DP-SGD step adds noise of std ``lr * sigma * C / (q n)`` per parameter
    (Opacus: Gaussian of std sigma * C on the summed clipped gradients, divided
    by the expected batch size q n); the rounding error of the average must be
    under 1 % of that, with room to spare, at epsilon 10 (less noise than any
    job here runs with) over 10 rounds.
    """
    from fedvault.examples import get_example
    from fedvault.privacy.dp import PrivacyConfig, plan_dp

    d = get_example(example).defaults
    plan = plan_dp(
        PrivacyConfig(epsilon=10.0, max_grad_norm=d.max_grad_norm, accountant="rdp"),
        num_samples=samples,
        batch_size=min(d.batch_size, samples),  # full batch, as the hospitals run it
        local_epochs=d.local_epochs,
        rounds=10,
    )
    expected_batch = plan.sample_rate * samples
    noise_std = d.learning_rate * plan.noise_multiplier * d.max_grad_norm / expected_batch
    assert FixedPoint().max_error < 0.01 * noise_std / 5


def test_sum_of_thousands_of_fresh_ciphertexts_is_exact(ctx: HeContext) -> None:
    """The noise margin (q / 2t = 2**12) holds for 3,000 summed symmetric encryptions."""
    pub = ctx.public()
    rng = np.random.default_rng(2)
    update = {"u": rng.uniform(-1, 1, 64)}
    agg = Aggregator(pub)
    for _ in range(3000):
        agg.add(encrypt_update(ctx, update, weight=1.0))
    avg = decrypt_average(ctx, agg.result())["u"]
    np.testing.assert_allclose(avg, update["u"], rtol=0, atol=2.0**-17)


def test_wire_size_is_about_two_float32s(ctx: HeContext) -> None:
    """Seed-compressed symmetric chunks: ~8 bytes per value, half a public-key chunk."""
    values = 10 * ctx.params.slots
    update = {"u": np.zeros(values, dtype=np.float32)}
    sym = encrypt_update(ctx, update, weight=1.0)
    asym = encrypt_update(ctx.public(), update, weight=1.0)
    assert len(sym) / (4 * values) < 2.05
    assert 1.95 < len(asym) / len(sym) < 2.05
    # SEAL still checks a seeded chunk fully when it expands it.
    chunk = parse_envelope(sym).chunks[0]
    assert seal_bytes.load_ciphertext(ctx.seal, chunk).size() == 2
