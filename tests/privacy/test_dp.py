"""DP-SGD and accounting, tested numerically.

Epsilon values are pinned and cross-checked with Google's independent
``dp_accounting`` PLD accountant; the noise level of a DP step is checked
statistically; epsilon is shown to accumulate across rounds that each build a
fresh engine restored from the previous state (and not to, without it).
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.privacy.dp import (
    AccountantState,
    PrivacyConfig,
    compute_epsilon,
    make_private,
    plan_dp,
)

DELTA = 1e-5

# Opacus hooks warn when inputs do not require grad; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

# (noise_multiplier, sample_rate, steps) -> PRV epsilon at delta=1e-5 (Opacus 1.6).
PINNED_PRV = [
    ((1.1, 0.01, 1000), 1.525472649316146),
    ((0.8, 0.02, 200), 3.2734389645037414),
    ((2.0, 0.1, 50), 1.6626231027347878),
]


# --- configuration ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epsilon": 0}, "epsilon"),
        ({"epsilon": -1}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"epsilon": True}, "epsilon"),
        ({"epsilon": 3, "delta": 0}, "delta"),
        ({"epsilon": 3, "delta": 1}, "delta"),
        ({"epsilon": 3, "delta": 1.5}, "delta"),
        ({"epsilon": 3, "delta": math.nan}, "delta"),
        ({"epsilon": 3, "max_grad_norm": 0}, "max_grad_norm"),
        ({"epsilon": 3, "max_grad_norm": math.inf}, "max_grad_norm"),
        ({"epsilon": 3, "accountant": "gdp"}, "accountant"),
    ],
)
def test_privacy_config_rejects_out_of_domain(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        PrivacyConfig(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(name)
    assert repr(kwargs[name]) in message  # names the value given


def test_privacy_config_defaults() -> None:
    config = PrivacyConfig(epsilon=3)
    assert (config.delta, config.max_grad_norm, config.accountant) == (1e-5, 1.0, "prv")


# --- pinned epsilons, checked against an independent accountant -------------


def _pld_epsilon(nm: float, sr: float, steps: int) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    event = dp_accounting.PoissonSampledDpEvent(sr, dp_accounting.GaussianDpEvent(nm))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(DELTA))


@pytest.mark.parametrize(("params", "pinned"), PINNED_PRV)
def test_prv_epsilon_pinned_and_matches_google_pld(
    params: tuple[float, float, int], pinned: float
) -> None:
    nm, sr, steps = params
    prv = compute_epsilon(noise_multiplier=nm, sample_rate=sr, steps=steps, delta=DELTA)
    assert prv == pytest.approx(pinned, rel=1e-3)
    # Two independent numerical accountants of the same mechanism: PRV (Opacus,
    # an upper bound with eps_error=0.01) and PLD (Google) agree within 2 %.
    pld = _pld_epsilon(nm, sr, steps)
    assert abs(prv - pld) / pld < 0.02
    # RDP is a valid but looser bound: never below the tight accountant.
    rdp = compute_epsilon(
        noise_multiplier=nm, sample_rate=sr, steps=steps, delta=DELTA, accountant="rdp"
    )
    assert rdp >= prv
    assert rdp < 1.5 * prv  # ... and not absurdly loose in this regime


def test_epsilon_grows_with_steps_and_falls_with_noise() -> None:
    def eps(nm: float, steps: int) -> float:
        return compute_epsilon(noise_multiplier=nm, sample_rate=0.1, steps=steps, delta=DELTA)

    assert eps(1.0, 10) < eps(1.0, 40)
    assert eps(2.0, 40) < eps(1.0, 40)
    assert compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=DELTA) == 0.0


# --- planning ----------------------------------------------------------------


def test_plan_dp_lands_just_under_target() -> None:
    config = PrivacyConfig(epsilon=3.0)
    plan = plan_dp(config, num_samples=200, batch_size=50, local_epochs=1, rounds=5)
    assert (plan.sample_rate, plan.steps_per_round, plan.total_steps) == (0.25, 4, 20)
    planned = compute_epsilon(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.total_steps,
        delta=config.delta,
    )
    assert 0.95 * 3.0 <= planned <= 3.0
    # Cached: every hospital and round asks again; PRV is not free.
    again = plan_dp(config, num_samples=200, batch_size=50, local_epochs=1, rounds=5)
    assert again is plan


def test_plan_dp_matches_what_opacus_samples() -> None:
    # 210 / 50 does not divide: Opacus samples at 1/len(loader) = 1/5, not 50/210.
    data = TensorDataset(torch.zeros(210, 2))
    dp_loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=50))
    config = PrivacyConfig(epsilon=2.0, accountant="rdp")
    plan = plan_dp(config, num_samples=210, batch_size=50, local_epochs=2, rounds=3)
    assert plan.sample_rate == dp_loader.sample_rate == 0.2
    assert plan.steps_per_round == 2 * len(dp_loader) == 10
    planned = compute_epsilon(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.total_steps,
        delta=config.delta,
        accountant="rdp",
    )
    assert 0.95 * 2.0 <= planned <= 2.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_samples": 10, "batch_size": 11}, "batch_size"),
        ({"rounds": 0}, "rounds"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"num_samples": 0, "batch_size": 1}, "num_samples"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_plan_dp_validates(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {
        "num_samples": 100,
        "batch_size": 10,
        "local_epochs": 1,
        "rounds": 1,
    }
    args |= kwargs
    with pytest.raises(InvalidConfigError, match=name):
        plan_dp(PrivacyConfig(epsilon=1.0), **args)  # type: ignore[arg-type]


def test_plan_dp_budget_too_small() -> None:
    with pytest.raises(InvalidConfigError, match="too small"):
        plan_dp(
            PrivacyConfig(epsilon=1e-9, accountant="rdp"),
            num_samples=100,
            batch_size=100,
            local_epochs=1,
            rounds=1,
        )


# --- accountant state --------------------------------------------------------


def test_state_extends_like_opacus() -> None:
    state = AccountantState().extended(noise_multiplier=1.0, sample_rate=0.25, steps=4)
    state = state.extended(noise_multiplier=1.0, sample_rate=0.25, steps=4)
    state = state.extended(noise_multiplier=2.0, sample_rate=0.25, steps=1)
    assert state.history == ((1.0, 0.25, 8), (2.0, 0.25, 1))
    assert state.steps == 9
    # The same history, stepped by a real Opacus accountant.
    opacus = AccountantState().to_opacus()
    for nm in [1.0] * 8 + [2.0]:
        opacus.step(noise_multiplier=nm, sample_rate=0.25)
    assert AccountantState.from_opacus(opacus) == state
    # Restored into Opacus, it keeps stepping from where it was.
    restored = state.to_opacus()
    restored.step(noise_multiplier=2.0, sample_rate=0.25)
    assert AccountantState.from_opacus(restored).history[-1] == (2.0, 0.25, 2)
    assert restored.get_epsilon(DELTA) == pytest.approx(
        AccountantState.from_opacus(restored).epsilon(DELTA), rel=1e-9
    )


def test_state_epsilon_and_composition() -> None:
    assert AccountantState().epsilon(DELTA) == 0.0
    a = AccountantState().extended(noise_multiplier=1.0, sample_rate=0.1, steps=20)
    b = AccountantState("rdp").extended(noise_multiplier=1.5, sample_rate=0.05, steps=30)
    both = a.composed_with(b)
    assert both.accountant == "prv"
    assert both.history == ((1.0, 0.1, 20), (1.5, 0.05, 30))
    # Composition commutes: the order of jobs does not change the spend.
    other_order = AccountantState().composed_with(b).composed_with(a)
    assert both.epsilon(DELTA) == pytest.approx(other_order.epsilon(DELTA), rel=1e-9)
    assert both.epsilon(DELTA) > max(
        a.epsilon(DELTA), AccountantState(history=b.history).epsilon(DELTA)
    )
    with pytest.raises(InvalidConfigError, match="delta"):
        a.epsilon(0.0)


def test_state_json_round_trip() -> None:
    state = AccountantState("rdp", ((1.0000000001, 1 / 3, 7), (0.5, 0.01, 1)))
    text = state.to_json()
    assert AccountantState.from_json(text) == state
    assert AccountantState.from_json(text.encode()) == state


_HEAD = '{"format": "fedvault.accountant_state", "version": 1, '


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"format": "pickle", "version": 1, "accountant": "prv", "history": []}',
        '{"format": "fedvault.accountant_state", "version": 2, "accountant": "prv", "history": []}',
        _HEAD + '"accountant": "gdp", "history": []}',
        _HEAD + '"history": []}',
        _HEAD + '"accountant": "prv"}',
        _HEAD + '"accountant": "prv", "history": {}}',
        _HEAD + '"accountant": "prv", "history": [[NaN, 0.1, 1]]}',
        _HEAD + '"accountant": "prv", "history": [[1e999, 0.1, 1]]}',
        _HEAD + '"accountant": "prv", "history": [[1.0, 1.5, 1]]}',
        _HEAD + '"accountant": "prv", "history": [[1.0, 0.1, -3]]}',
        _HEAD + '"accountant": "prv", "history": [[1.0, 0.1, 2.5]]}',
        _HEAD + '"accountant": "prv", "history": [[1.0, 0.1, true]]}',
        _HEAD + '"accountant": "prv", "history": [[1.0, 0.1]]}',
        _HEAD + '"accountant": "prv", "history": [["1.0", 0.1, 1]]}',
    ],
)
def test_state_json_rejects_garbage(text: str) -> None:
    with pytest.raises(MalformedUpdateError):
        AccountantState.from_json(text)


# --- training ----------------------------------------------------------------


def _logistic_data(seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 5, generator=gen)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0]) > 0).float().unsqueeze(1)
    return TensorDataset(x, y)


def _train_round(
    data: TensorDataset, weights: dict[str, torch.Tensor] | None, state: AccountantState
) -> tuple[dict[str, torch.Tensor], AccountantState, float]:
    """One round as a hospital process runs it: fresh model, optimizer and engine."""
    model = nn.Linear(5, 1)
    if weights is not None:
        model.load_state_dict(weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    private = make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=50),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        state=state,
    )
    criterion = nn.BCEWithLogitsLoss()
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        criterion(private.module(x), y).backward()
        private.optimizer.step()
    # The engine's own (Opacus) epsilon and ours agree.
    assert private.engine.get_epsilon(DELTA) == pytest.approx(private.epsilon(DELTA), rel=1e-9)
    return model.state_dict(), private.state(), private.epsilon(DELTA)


def test_epsilon_accumulates_across_rounds_with_restored_state() -> None:
    torch.manual_seed(0)
    data = _logistic_data()
    weights, state1, eps1 = _train_round(data, None, AccountantState())
    assert state1.history == ((1.0, 0.25, 4),)
    # Round 2 in a "new process": the state travels as JSON, like the ledger keeps it.
    restored = AccountantState.from_json(state1.to_json())
    _, state2, eps2 = _train_round(data, weights, restored)
    assert state2.history == ((1.0, 0.25, 8),)
    assert eps2 > eps1 * 1.2
    assert eps2 == pytest.approx(
        compute_epsilon(noise_multiplier=1.0, sample_rate=0.25, steps=8, delta=DELTA),
        rel=1e-12,
    )
    # The bug this prevents: a fresh engine per round forgets round 1 entirely.
    _, forgetful, eps_bug = _train_round(data, weights, AccountantState())
    assert forgetful.steps == 4
    assert eps_bug == pytest.approx(eps1, rel=1e-12)
    assert eps_bug < eps2


def test_noise_level_of_a_dp_step() -> None:
    """With zero per-sample gradients, p.grad is pure noise of std nm * C / E[batch]."""
    torch.manual_seed(1234)
    dim, nm, clip = 4000, 1.3, 0.7
    data = TensorDataset(torch.zeros(200, dim))
    model = nn.Linear(dim, 1, bias=False)
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(data, batch_size=50),
        noise_multiplier=nm,
        max_grad_norm=clip,
        state=AccountantState(),
    )
    samples = []
    for (x,) in private.data_loader:
        private.optimizer.zero_grad()
        private.module(x).mean().backward()
        private.optimizer.step()
        grad = model.weight.grad
        assert grad is not None
        samples.append(grad.detach().numpy().ravel().copy())
    noise = np.concatenate(samples)  # 4 steps x 4000 = 16000 draws
    expected_std = nm * clip / 50  # expected batch = 200 * 0.25
    # Relative standard error of a sample std over n draws is 1/sqrt(2n) ~ 0.56 %;
    # 3 % is > 5 standard errors, and a factor-of-batch-size bug is 50x.
    assert np.std(noise) == pytest.approx(expected_std, rel=0.03)
    assert abs(np.mean(noise)) < 5 * expected_std / math.sqrt(noise.size)
    assert private.state().history == ((nm, 0.25, 4),)


def test_per_sample_clipping() -> None:
    """Every per-sample gradient has norm 10; each is clipped to C before summing."""
    torch.manual_seed(7)
    direction = torch.arange(1.0, 6.0)
    x = (10 * direction / direction.norm()).repeat(200, 1)
    model = nn.Linear(5, 1, bias=False)
    clip = 0.5
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(x), batch_size=50),
        noise_multiplier=1e-9,  # negligible noise: test the clipping alone
        max_grad_norm=clip,
        state=AccountantState(),
    )
    (batch,) = next(iter(private.data_loader))
    private.module(batch).mean().backward()
    private.optimizer.step()
    # grad = sum_i clip(g_i) / E[batch] = len(batch) * C * unit / 50
    expected = len(batch) * clip * (direction / direction.norm()) / 50
    grad = model.weight.grad
    assert grad is not None
    np.testing.assert_allclose(grad.ravel().numpy(), expected.numpy(), rtol=1e-5)


def test_make_private_refuses_batchnorm_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(InvalidConfigError) as info:
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_logistic_data(), batch_size=50),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            state=AccountantState(),
        )
    assert "'1' (BatchNorm1d)" in str(info.value)
    assert "ModuleValidator.fix" in str(info.value)


@pytest.mark.parametrize(
    ("nm", "clip", "name"), [(0.0, 1.0, "noise_multiplier"), (1.0, -1.0, "max_grad_norm")]
)
def test_make_private_validates_parameters(nm: float, clip: float, name: str) -> None:
    model = nn.Linear(5, 1)
    with pytest.raises(InvalidConfigError, match=name):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_logistic_data(), batch_size=50),
            noise_multiplier=nm,
            max_grad_norm=clip,
            state=AccountantState(),
        )
