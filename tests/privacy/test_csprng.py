"""DP-SGD's noise and Poisson batches from the CSPRNG (``privacy/csprng.py``).

The acceptance of "noise from a cryptographic source": the noise a DP step
adds passes a Kolmogorov-Smirnov test against N(0, (sigma C)^2) (and a
mis-scaled distribution fails the same test), and two runs with the same torch
seed draw different noise. Around it: Poisson batch sizes are binomial, empty
batches still step, the accountant counts the same steps as on the fast path,
and the clipped-gradient part of a step is the fast path's.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvault.client.training import train_private
from fedvault.config import TrainingConfig
from fedvault.errors import InvalidConfigError
from fedvault.privacy.csprng import (
    ChaChaRandom,
    SecureDPDataLoader,
    SecureDPOptimizer,
    SecureDPOptimizerFastGradientClipping,
    SecurePoissonSampler,
    secure_noise,
)
from fedvault.privacy.dp import AccountantState, DpPlan, make_private
from fedvault.task import Task, TrainingDefaults

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DELTA = 1e-5
NO_NOISE = 1e-12
# The acceptance test's level: a correct generator fails it once in 1,000 runs
# (the draws are fresh every run, by design). The generator's own checks use a
# stricter level, so the file as a whole rarely fails by chance.
KS_ALPHA = 1e-3
STRICT_ALPHA = 1e-5


# --- the generator itself ------------------------------------------------------


def test_uniforms_are_53_bit_doubles_in_the_unit_interval() -> None:
    u = ChaChaRandom().uniform(200_000).numpy()
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    k = u * 2.0**53
    assert np.array_equal(k, np.floor(k))  # multiples of 2**-53
    assert np.any(k % 2 == 1)  # ... using the 53rd bit too
    assert stats.kstest(u, "uniform").pvalue > STRICT_ALPHA


@pytest.mark.parametrize("count", [1, 2, 3, 100_000])
def test_standard_normal_has_the_right_law_at_any_count(count: int) -> None:
    rng = ChaChaRandom()
    z = torch.cat([rng.standard_normal(count) for _ in range(max(1, 10_000 // count))])
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert stats.kstest(z.numpy(), "norm").pvalue > STRICT_ALPHA


def test_two_generators_differ_and_a_forked_child_rekeys() -> None:
    a, b = ChaChaRandom(), ChaChaRandom()
    assert not torch.equal(a.uniform(8), b.uniform(8))
    stream = a._encryptor
    a._pid = -1  # as if in a forked child, which must not repeat its parent's stream
    a.uniform(8)
    assert a._encryptor is not stream and a._pid == os.getpid()


def test_gaussian_like_follows_the_reference() -> None:
    ref = torch.zeros(3, 4, dtype=torch.float32)
    noise = ChaChaRandom().gaussian_like(ref, 2.5)
    assert noise.shape == ref.shape and noise.dtype == ref.dtype and noise.device == ref.device
    assert torch.equal(ChaChaRandom().gaussian_like(ref, 0.0), ref)


# --- the noise of a DP step ----------------------------------------------------


def _noise_of_dp_steps(
    mode: str, *, secure_rng: bool, dim: int, steps: int, nm: float, clip: float, seed: int = 0
) -> tuple[np.ndarray, int]:
    """``p.grad`` of ``steps`` DP steps whose per-sample gradients are all zero: pure noise.

    Returns the noise and the expected batch size it is divided by.
    """
    torch.manual_seed(seed)
    n, batch = 40, 10
    model = nn.Linear(dim, 1, bias=False)
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(n, dim), torch.zeros(n, 1)), batch),
        noise_multiplier=nm,
        max_grad_norm=clip,
        state=AccountantState(),
        secure_rng=secure_rng,
        grad_sample_mode=mode,  # type: ignore[arg-type]
        criterion=nn.MSELoss(),
    )
    assert private.grad_sample_mode == mode
    assert private.criterion is not None
    draws = []
    loader = iter(private.data_loader)
    for _ in range(steps):
        x, y = next(loader)
        private.optimizer.zero_grad(set_to_none=True)
        if not len(y) and mode == "ew":  # ExpandedWeights refuses batch 0
            private.noise_only_step()
        else:
            out = private.module(x)
            (private.criterion(out, y) if len(y) else out.sum() * 0.0).backward()
            private.optimizer.step()
        assert model.weight.grad is not None
        draws.append(model.weight.grad.detach().numpy().ravel().copy())
    return np.concatenate(draws), batch


@pytest.mark.parametrize("mode", ["hooks", "ghost", "ew"])
def test_dp_step_noise_passes_ks_against_n_0_sigma_c(mode: str) -> None:
    nm, clip = 1.3, 0.7
    noise, batch = _noise_of_dp_steps(mode, secure_rng=True, dim=25_000, steps=4, nm=nm, clip=clip)
    assert noise.size == 100_000
    scaled = noise * batch  # the optimizer divides the noisy sum by the expected batch
    sigma_c = nm * clip
    assert stats.kstest(scaled, "norm", args=(0.0, sigma_c)).pvalue > KS_ALPHA
    # The test has teeth: the same draws, 5 % too wide or too narrow, are rejected
    # (p ~ 1e-11 for a right generator).
    for wrong in (0.95, 1.05):
        assert stats.kstest(scaled, "norm", args=(0.0, wrong * sigma_c)).pvalue < KS_ALPHA


def test_same_seed_gives_different_noise_with_the_csprng_and_the_same_without() -> None:
    def noise(secure_rng: bool) -> np.ndarray:
        return _noise_of_dp_steps(
            "hooks", secure_rng=secure_rng, dim=64, steps=1, nm=1.0, clip=1.0, seed=7
        )[0]

    assert not np.array_equal(noise(True), noise(True))
    assert np.array_equal(noise(False), noise(False))  # the control: torch's seeded generator


def _one_step(model: nn.Module, mode: str, secure_rng: bool) -> tuple[nn.Module, Any]:
    gen = torch.Generator().manual_seed(3)
    x, y = 3 * torch.randn(24, 10, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    model = copy.deepcopy(model).train()
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(24)), batch_size=12),
        noise_multiplier=NO_NOISE,
        max_grad_norm=0.1,
        state=AccountantState(),
        secure_rng=secure_rng,
        grad_sample_mode=mode,  # type: ignore[arg-type]
        criterion=nn.CrossEntropyLoss(),
    )
    assert private.criterion is not None
    private.optimizer.zero_grad(set_to_none=True)
    private.criterion(private.module(x), y).backward()
    private.optimizer.step()
    return model, private


@pytest.mark.parametrize("mode", ["hooks", "ghost", "ew"])
def test_the_clipped_gradient_part_of_a_step_is_the_fast_paths(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    secure, private = _one_step(model, mode, secure_rng=True)
    fast, fast_private = _one_step(model, mode, secure_rng=False)
    assert (private.noise_source, fast_private.noise_source) == ("chacha20", "torch")
    expected = SecureDPOptimizerFastGradientClipping if mode == "ghost" else SecureDPOptimizer
    assert type(private.optimizer) is expected
    assert isinstance(private.data_loader, SecureDPDataLoader)
    assert isinstance(private.data_loader.batch_sampler, SecurePoissonSampler)
    moved = False
    for p, q, p0 in zip(secure.parameters(), fast.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        moved |= not torch.equal(p, p0)
    assert moved
    assert private.state().history == fast_private.state().history == ((NO_NOISE, 0.5, 1),)


def test_secure_noise_refuses_an_optimizer_it_does_not_cover() -> None:
    from opacus.optimizers import DPOptimizer

    class Other(DPOptimizer):  # type: ignore[misc]
        pass

    param = nn.Parameter(torch.zeros(2))
    other = Other(
        torch.optim.SGD([param], lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    with pytest.raises(InvalidConfigError, match="no CSPRNG noise for Opacus optimizer Other"):
        secure_noise(other)


# --- Poisson sampling ----------------------------------------------------------


def test_poisson_batch_sizes_are_binomial() -> None:
    n, q, steps = 1000, 0.05, 3000
    sampler = SecurePoissonSampler(num_samples=n, sample_rate=q, steps=steps)
    assert len(sampler) == steps
    batches = list(sampler)
    assert len(batches) == steps
    sizes = np.array([len(b) for b in batches])
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (steps - 1))
    every = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
    assert every.min() >= 0 and every.max() < n
    assert all(len(set(b)) == len(b) for b in batches)  # each record at most once a batch
    # Every record is drawn with the same probability: counts are Binomial(steps, q).
    counts = np.bincount(every, minlength=n)
    assert stats.chisquare(counts).pvalue > STRICT_ALPHA


def test_default_steps_are_opacus() -> None:
    assert len(SecurePoissonSampler(num_samples=10, sample_rate=0.3)) == int(1 / 0.3)


def _task() -> Task:
    return Task(
        name="csprng",
        kind="multiclass",
        build_model=lambda: nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)),
        num_outputs=3,
        defaults=TrainingDefaults(batch_size=1, learning_rate=0.5),
    )


def _train(model: nn.Module, secure_rng: bool, **kwargs: Any) -> Any:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 10, generator=gen), torch.randint(0, 3, (40,)))
    batch = kwargs.pop("batch_size", 1)
    plan = DpPlan(
        noise_multiplier=1.1, sample_rate=batch / 40, steps_per_round=40 // batch, rounds=1
    )
    return train_private(
        model,
        data,
        task=_task(),
        training=TrainingConfig(batch_size=batch, learning_rate=0.5, local_epochs=1),
        max_grad_norm=1.0,
        batch_size=batch,
        plan=plan,
        state=AccountantState("rdp"),
        device=torch.device("cpu"),
        seed=5,
        secure_rng=secure_rng,
        **kwargs,
    )


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_batches_still_step_and_the_accountant_counts_as_on_the_fast_path(
    mode: str,
) -> None:
    """q = 1/40 over 40 steps: ~36 % of batches are empty (all non-empty: p ~ 2e-8)."""
    results, sizes = {}, {}
    for secure_rng in (True, False):
        model = _task().build_model()
        seen: list[int] = []
        model.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(len(args[0])))
        results[secure_rng] = _train(model, secure_rng, grad_sample_mode=mode)
        sizes[secure_rng] = seen
        assert all(torch.isfinite(p).all() for p in model.parameters())
    secure, fast = results[True], results[False]
    assert 0 in sizes[True]  # the case under test happened
    assert len(sizes[True]) == 40
    assert secure.round_steps == fast.round_steps == 40
    assert secure.state.history == fast.state.history == ((1.1, 1 / 40, 40),)
    assert secure.state.epsilon(DELTA) == fast.state.epsilon(DELTA)


def test_virtual_steps_with_the_csprng_count_one_step_per_logical_batch() -> None:
    model = _task().build_model()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    result = _train(model, True, batch_size=20, max_physical_batch_size=4)
    assert max(seen) <= 4
    assert result.round_steps == 2
    assert result.state.history == ((1.1, 0.5, 2),)


def test_the_deployed_path_defaults_to_the_csprng() -> None:
    import inspect

    from fedvault.app.simulation import SimulatedSites, simulate
    from fedvault.client.site import HospitalSite

    assert inspect.signature(make_private).parameters["secure_rng"].default is True
    assert inspect.signature(train_private).parameters["secure_rng"].default is True
    fields = HospitalSite.__dataclass_fields__
    assert fields["secure_rng"].default is True  # deployment: always
    # Simulation: seeded and reproducible unless asked (--secure-rng).
    assert SimulatedSites.__dataclass_fields__["secure_rng"].default is False
    assert inspect.signature(simulate).parameters["secure_rng"].default is False
