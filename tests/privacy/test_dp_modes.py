"""Ghost clipping, hooks and virtual steps: the same DP-SGD step, tested numerically.

Ghost clipping (Opacus' fast gradient clipping) must give exactly the step
hooks mode gives (same per-sample clipping, same noise, same accountant), take
an empty Poisson batch's noise-only step, and never materialise a per-sample
gradient of a ghost-clipped layer. Splitting Poisson batches into physical
batches (``max_physical_batch_size``) must change neither the step count nor
epsilon nor the parameters. Seeded, CPU only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from fedvault.client.training import train_private
from fedvault.config import TrainingConfig
from fedvault.errors import InvalidConfigError
from fedvault.examples.digits import build_model as digits_cnn
from fedvault.privacy.dp import (
    EW_MAX_PARAMS,
    AccountantState,
    DpPlan,
    PrivacyConfig,
    choose_grad_sample_mode,
    make_private,
    plan_dp,
)
from fedvault.task import Task, TrainingDefaults

DELTA = 1e-5
NO_NOISE = 1e-12  # the smallest kind of noise make_private accepts (it refuses 0)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


# --- models -------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))


class LoRALinear(nn.Module):
    """A frozen pretrained ``nn.Linear`` plus a trainable low-rank adapter (two ``nn.Linear``)."""

    def __init__(self, d_in: int, d_out: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)  # non-zero, so both adapters get gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def _frozen_encoder() -> nn.Module:
    """A frozen pretrained encoder (with a PReLU ghost clipping cannot handle) under adapters."""
    encoder = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.PReLU())
    encoder.requires_grad_(False)
    return nn.Sequential(encoder, LoRALinear(32, 16), nn.Tanh(), nn.Linear(16, 3))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def _batch(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, 10, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# --- one step, straight through make_private ---------------------------------


def _one_step(
    model: nn.Module,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    criterion: Callable[..., Any] | None = None,
    clip: float = 0.1,
    noise: float = NO_NOISE,
    expected_batch: int | None = None,
) -> tuple[nn.Module, AccountantState]:
    """One private SGD step (lr 1) on exactly the batch ``(x, y)``; the model after it.

    The sample rate is 1/2, at an expected batch of ``len(x) // 2`` unless given.
    """
    expected = expected_batch or len(x) // 2
    model = copy.deepcopy(model).train()
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.zeros(2 * expected)), batch_size=expected),
        noise_multiplier=noise,
        max_grad_norm=clip,
        state=AccountantState(),
        grad_sample_mode=mode,  # type: ignore[arg-type]
        criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
    )
    assert private.grad_sample_mode == mode
    assert private.criterion is not None
    private.optimizer.zero_grad(set_to_none=True)
    if not len(y) and mode == "ew":  # as train_private: ExpandedWeights refuses batch 0
        private.noise_only_step()
        return model, private.state()
    outputs = private.module(x)
    loss = private.criterion(outputs, y) if len(y) else outputs.sum() * 0.0
    loss.backward()
    private.optimizer.step()
    return model, private.state()


def _reference_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, expected_batch: int
) -> tuple[nn.Module, int]:
    """DP-SGD by hand, one sample at a time: sum of clipped gradients / expected batch.

    Also returns how many samples' gradients were clipped.
    """
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    clipped = 0
    for i in range(len(x)):
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params
        )
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, clip / (float(norm) + 1e-6))
        clipped += scale < 1.0
        for t, g in zip(total, grads, strict=True):
            t += scale * g
    with torch.no_grad():
        for p, t in zip(params, total, strict=True):
            p -= t / expected_batch
    return model, clipped


def _assert_same_params(a: nn.Module, b: nn.Module, rtol: float = 1e-5) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("build", [_mlp, _frozen_encoder], ids=["mlp", "frozen_encoder"])
def test_ghost_step_equals_hooks_step(build: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = build()
    x, y = _batch()
    ghost, ghost_state = _one_step(model, "ghost", x, y)
    hooks, hooks_state = _one_step(model, "hooks", x, y)
    ew, ew_state = _one_step(model, "ew", x, y)
    _assert_same_params(ghost, hooks)
    _assert_same_params(ew, hooks)
    assert ghost_state.history == hooks_state.history == ew_state.history == ((NO_NOISE, 0.5, 1),)
    # ... and both are the DP-SGD step computed sample by sample, with clipping at work.
    reference, clipped = _reference_step(model, x, y, clip=0.1, expected_batch=len(x) // 2)
    assert clipped >= len(x) // 2
    _assert_same_params(ghost, reference, rtol=1e-4)
    frozen_before = [p for p in model.parameters() if not p.requires_grad]
    frozen_after = [p for p in ghost.parameters() if not p.requires_grad]
    for p, q in zip(frozen_before, frozen_after, strict=True):
        assert torch.equal(p, q)


def test_ghost_step_equals_hooks_step_for_a_cnn() -> None:
    """Conv and GroupNorm go through fast gradient clipping inside ghost mode."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    model = _cnn()
    ghost, _ = _one_step(model, "ghost", x, y, clip=0.05)
    hooks, _ = _one_step(model, "hooks", x, y, clip=0.05)
    ew, _ = _one_step(model, "ew", x, y, clip=0.05)
    _assert_same_params(ghost, hooks)
    _assert_same_params(ew, hooks)
    # ... and the DP-SGD step computed sample by sample, with clipping at work.
    reference, clipped = _reference_step(model, x, y, clip=0.05, expected_batch=len(x) // 2)
    assert clipped >= len(x) // 2
    _assert_same_params(ew, reference, rtol=1e-4)


def test_ghost_loss_with_one_column_per_sample_is_clipped_per_sample() -> None:
    """BCEWithLogits on (n, 1) logits: (n, 1) per-sample losses must not broadcast to (n, n)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))
    x, labels = _batch(20, seed=2)
    y = (labels > 0).float().unsqueeze(1)
    ghost, _ = _one_step(model, "ghost", x, y, criterion=nn.BCEWithLogitsLoss(), clip=0.05)
    hooks, _ = _one_step(model, "hooks", x, y, criterion=nn.BCEWithLogitsLoss(), clip=0.05)
    ew, _ = _one_step(model, "ew", x, y, criterion=nn.BCEWithLogitsLoss(), clip=0.05)
    _assert_same_params(ghost, hooks)
    _assert_same_params(ew, hooks)


@pytest.mark.parametrize("mode", ["ghost", "hooks", "ew"])
def test_empty_poisson_batch_takes_a_noise_only_step(mode: str) -> None:
    torch.manual_seed(3)
    model = _mlp()
    x, y = _batch()
    after, state = _one_step(model, mode, x[:0], y[:0], noise=1.0, expected_batch=12)
    assert state.history == ((1.0, 0.5, 1),)  # the accountant counted the step
    for p, q in zip(model.parameters(), after.parameters(), strict=True):
        assert torch.isfinite(q).all()
        assert not torch.equal(p, q)  # moved by noise alone


# --- train_private: modes, empty batches, virtual steps -----------------------


def _task(build: Callable[[], nn.Module] = _mlp) -> Task:
    return Task(
        name="modes",
        kind="multiclass",
        build_model=build,
        num_outputs=3,
        defaults=TrainingDefaults(batch_size=8, learning_rate=0.5),
    )


def _data(n: int, seed: int = 0) -> TensorDataset:
    return TensorDataset(*_batch(n, seed))


def _wrap(model: nn.Module, mode: str = "auto", criterion: Any = None, **kwargs: Any) -> Any:
    """``make_private`` of ``model`` on 20 random records, the settings the mode checks use."""
    return make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(20), batch_size=5),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        state=AccountantState(),
        grad_sample_mode=mode,
        criterion=criterion,
        **kwargs,
    )


def _train(
    model: nn.Module,
    data: TensorDataset,
    plan: DpPlan,
    *,
    batch_size: int,
    epochs: int = 1,
    **kwargs: Any,
) -> Any:
    return train_private(
        model,
        data,
        task=_task(),
        training=TrainingConfig(
            batch_size=batch_size, learning_rate=0.5, local_epochs=epochs, momentum=0.5
        ),
        max_grad_norm=0.5,
        batch_size=batch_size,
        plan=plan,
        state=AccountantState("rdp"),
        device=torch.device("cpu"),
        seed=11,
        # Seeded noise and batches: these tests compare runs value for value.
        **{"secure_rng": False, **kwargs},
    )


def test_train_private_ghost_and_hooks_agree_including_empty_batches() -> None:
    """Same seed, same Poisson batches (some empty), same noise: same model, same spend."""
    data = _data(40)
    config = PrivacyConfig(epsilon=3.0, accountant="rdp")  # RDP: quick to plan and check
    plan = plan_dp(config, num_samples=40, batch_size=1, local_epochs=1, rounds=1)
    assert plan.steps_per_round == 40
    # The batches train_private will draw (its loader's generator is seeded the same way).
    loader = DataLoader(
        data, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(11)
    )
    sizes = [len(b[0]) for b in DPDataLoader.from_data_loader(loader)]
    assert sizes.count(0) >= 5  # the case under test happens

    torch.manual_seed(0)
    model = _mlp()
    results = {}
    for mode in ("ghost", "hooks", "ew"):
        trained = copy.deepcopy(model)
        results[mode] = (trained, _train(trained, data, plan, batch_size=1, grad_sample_mode=mode))
    (hooks, h) = results["hooks"]
    assert h.round_steps == 40  # every batch, empty or not, is a step
    assert h.state.history == ((plan.noise_multiplier, plan.sample_rate, 40),)
    assert h.state.epsilon(DELTA) <= 3.0
    for mode in ("ghost", "ew"):
        other, o = results[mode]
        assert o.round_steps == h.round_steps
        assert o.state.history == h.state.history
        assert o.state.epsilon(DELTA) == h.state.epsilon(DELTA)
        assert o.loss == pytest.approx(h.loss, rel=1e-5)
        _assert_same_params(other, hooks, rtol=1e-4)


def test_auto_mode_is_ghost_for_the_task_loss() -> None:
    model = _mlp()
    private = _wrap(model, criterion=_task().criterion())
    assert private.grad_sample_mode == "ghost"
    # Callers that pass no criterion (they compute the loss themselves) keep hooks.
    model = _mlp()
    legacy = _wrap(model)
    assert (legacy.grad_sample_mode, legacy.criterion) == ("hooks", None)


def test_digits_round_in_auto_mode_is_the_hooks_round() -> None:
    """The digits CNN as a hospital trains it: ew (auto) and hooks, one round, same result."""
    from fedvault.examples.digits import TASK as DIGITS

    train, _ = DIGITS.load_data(0)
    data = TensorDataset(*train[:200])  # type: ignore[index]
    d = DIGITS.defaults
    config = PrivacyConfig(epsilon=3.0, accountant="rdp")
    plan = plan_dp(config, num_samples=200, batch_size=50, local_epochs=2, rounds=1)
    torch.manual_seed(0)
    model = digits_cnn()
    runs = {}
    for mode in ("auto", "hooks"):
        trained = copy.deepcopy(model)
        runs[mode] = (
            trained,
            train_private(
                trained,
                data,
                task=DIGITS,
                training=TrainingConfig(
                    batch_size=50, learning_rate=d.learning_rate, local_epochs=2, momentum=0.5
                ),
                max_grad_norm=d.max_grad_norm,
                batch_size=50,
                plan=plan,
                state=AccountantState("rdp"),
                device=torch.device("cpu"),
                seed=3,
                grad_sample_mode=mode,  # type: ignore[arg-type]
                secure_rng=False,
            ),
        )
    (ew, r_ew), (hooks, r_hooks) = runs["auto"], runs["hooks"]
    assert r_ew.state.history == r_hooks.state.history
    assert r_ew.round_steps == r_hooks.round_steps == plan.steps_per_round == 8
    assert r_ew.loss == pytest.approx(r_hooks.loss, rel=1e-5)
    _assert_same_params(ew, hooks, rtol=1e-4)
    assert any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), ew.parameters(), strict=True)
    )


@pytest.mark.parametrize("mode", ["ghost", "hooks", "ew"])
def test_virtual_steps_change_nothing(mode: str) -> None:
    """Physical batches of <= 5 from Poisson batches of ~16: same steps, epsilon and model."""
    data = _data(64)
    config = PrivacyConfig(epsilon=3.0, accountant="rdp")  # RDP: quick to plan and check
    plan = plan_dp(config, num_samples=64, batch_size=16, local_epochs=2, rounds=1)
    torch.manual_seed(0)
    model = _mlp()
    runs = {}
    for cap in (None, 5):
        trained = copy.deepcopy(model)
        seen: list[int] = []
        trained.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(len(args[0])))
        result = _train(
            trained,
            data,
            plan,
            batch_size=16,
            epochs=2,
            max_physical_batch_size=cap,
            grad_sample_mode=mode,
        )
        runs[cap] = (trained, result, seen)
    (full, r_full, seen_full), (split, r_split, seen_split) = runs[None], runs[5]
    assert max(seen_split) <= 5 < max(seen_full)  # the cap held, and it had work to do
    assert sum(seen_split) == sum(seen_full)  # the same samples
    assert r_split.round_steps == r_full.round_steps == plan.steps_per_round == 8
    assert r_split.state.history == r_full.state.history
    assert r_split.state.history == ((plan.noise_multiplier, plan.sample_rate, 8),)
    assert r_split.state.epsilon(DELTA) == r_full.state.epsilon(DELTA)
    assert r_split.loss == pytest.approx(r_full.loss, rel=1e-5)
    # Same Poisson batches and the same noise draws (one per logical step): same model.
    _assert_same_params(split, full, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ghost", "hooks", "ew"])
def test_one_logical_step_split_matches_unsplit_without_noise(mode: str) -> None:
    data = _data(64, seed=4)
    plan = DpPlan(noise_multiplier=NO_NOISE, sample_rate=1.0, steps_per_round=1, rounds=1)
    torch.manual_seed(4)
    model = _mlp()
    full, split = copy.deepcopy(model), copy.deepcopy(model)
    r_full = _train(full, data, plan, batch_size=64, grad_sample_mode=mode)
    r_split = _train(
        split, data, plan, batch_size=64, max_physical_batch_size=10, grad_sample_mode=mode
    )
    assert r_full.round_steps == r_split.round_steps == 1
    assert r_full.state.history == r_split.state.history == ((NO_NOISE, 1.0, 1),)
    _assert_same_params(split, full)
    moved = zip(model.parameters(), full.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in moved)


@pytest.mark.parametrize("cap", [0, -3, 2.5, True, "8"])
def test_physical_batch_cap_is_validated(cap: object) -> None:
    plan = DpPlan(noise_multiplier=1.0, sample_rate=0.5, steps_per_round=2, rounds=1)
    with pytest.raises(InvalidConfigError, match="max_physical_batch_size"):
        _train(_mlp(), _data(8), plan, batch_size=4, max_physical_batch_size=cap)


def test_mixed_precision_changes_nothing_on_cpu() -> None:
    data = _data(32)
    plan = DpPlan(noise_multiplier=1.0, sample_rate=0.25, steps_per_round=4, rounds=1)
    torch.manual_seed(5)
    model = _mlp()
    plain, mixed = copy.deepcopy(model), copy.deepcopy(model)
    _train(plain, data, plan, batch_size=8)
    _train(mixed, data, plan, batch_size=8, mixed_precision=True)
    for p, q in zip(plain.parameters(), mixed.parameters(), strict=True):
        assert torch.equal(p, q)


# --- choosing the mode --------------------------------------------------------


def test_choose_grad_sample_mode() -> None:
    assert choose_grad_sample_mode(_mlp()) == "ghost"
    # Conv/GroupNorm: ghost mode would materialise their per-sample gradients anyway
    # (fast gradient clipping) and add a second backward pass; ExpandedWeights does not.
    assert choose_grad_sample_mode(_cnn()) == "ew"
    assert choose_grad_sample_mode(digits_cnn()) == "ew"
    # ... up to EW_MAX_PARAMS: beyond, ghost mode's memory bound matters more.
    big = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 28))
    assert sum(p.numel() for p in big.parameters()) > EW_MAX_PARAMS
    assert choose_grad_sample_mode(big) == "ghost"
    # A layer ExpandedWeights has no rule for (trainable) keeps ghost mode.
    assert choose_grad_sample_mode(nn.Sequential(_cnn(), nn.RMSNorm(3))) == "ghost"
    # PReLU has neither a per-sample norm nor a per-sample gradient in Opacus' registry ...
    prelu = nn.Sequential(nn.Linear(10, 8), nn.PReLU(), nn.Linear(8, 3))
    assert choose_grad_sample_mode(prelu) == "hooks"
    # ... but frozen, it is irrelevant: only trainable layers are clipped.
    assert choose_grad_sample_mode(_frozen_encoder()) == "ghost"
    frozen_prelu = copy.deepcopy(prelu)
    frozen_prelu[1].requires_grad_(False)
    assert choose_grad_sample_mode(frozen_prelu) == "ghost"
    # Tied weights (ghost clipping refuses a parameter used twice), and a layer placed twice.
    tied = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    tied[2].weight = tied[0].weight
    assert choose_grad_sample_mode(tied) == "hooks"
    layer = nn.Linear(8, 8)
    assert choose_grad_sample_mode(nn.Sequential(layer, nn.Tanh(), layer)) == "hooks"
    assert choose_grad_sample_mode(nn.Sequential(nn.Linear(4, 4).requires_grad_(False))) == "hooks"


@pytest.mark.parametrize(("autocast", "mode"), [(False, "ew"), (True, "ghost")])
def test_auto_mode_avoids_ew_under_autocast(autocast: bool, mode: str) -> None:
    """ExpandedWeights under autocast is unverified: the same step by ghost clipping instead."""
    model = _cnn()
    private = _wrap(model, criterion=nn.CrossEntropyLoss(), autocast=autocast)
    assert private.grad_sample_mode == mode


def test_make_private_resolves_and_refuses_modes() -> None:
    def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, targets)

    prelu = nn.Sequential(nn.Linear(10, 8), nn.PReLU(), nn.Linear(8, 3))
    ce = nn.CrossEntropyLoss()
    assert _wrap(prelu, "auto", ce).grad_sample_mode == "hooks"
    assert _wrap(_mlp(), "auto", mse).grad_sample_mode == "hooks"  # not a per-sample loss
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
    assert _wrap(_mlp(), "auto", weighted).grad_sample_mode == "hooks"
    assert _wrap(_mlp(), "hooks", ce).criterion is ce
    with pytest.raises(InvalidConfigError, match=r"'1' \(PReLU\)"):
        _wrap(prelu, "ghost", ce)
    with pytest.raises(InvalidConfigError, match=r"not a torch\.nn loss"):
        _wrap(_mlp(), "ghost", mse)
    with pytest.raises(InvalidConfigError, match="no criterion"):
        _wrap(_mlp(), "ghost", None)
    assert _wrap(_mlp(), "ew", ce).grad_sample_mode == "ew"
    with pytest.raises(InvalidConfigError, match=r"'1' \(PReLU\) has no ExpandedWeights rule"):
        _wrap(prelu, "ew", ce)
    with pytest.raises(InvalidConfigError, match="no criterion"):
        _wrap(_mlp(), "ew", None)
    with pytest.raises(InvalidConfigError, match="noise_only_step"):
        _wrap(_mlp(), "ghost", ce).noise_only_step()
    with pytest.raises(InvalidConfigError, match="grad_sample_mode"):
        _wrap(_mlp(), "functorch", ce)


# --- memory, structurally -----------------------------------------------------


class _TensorShapes(TorchDispatchMode):
    """Records the shape of every tensor any operator returns (forward, backward, hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def _watched_step(model: nn.Module, mode: str, batch: int) -> tuple[set[tuple[int, ...]], int]:
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(batch, 512, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch // 4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        state=AccountantState(),
        grad_sample_mode=mode,  # type: ignore[arg-type]
        criterion=nn.CrossEntropyLoss(),
    )
    assert private.criterion is not None
    watch = _TensorShapes()
    with watch:
        private.optimizer.zero_grad(set_to_none=True)
        private.criterion(private.module(x), y).backward()
        grad_sample_bytes = sum(
            p.grad_sample.numel() * p.grad_sample.element_size()
            for p in model.parameters()
            if getattr(p, "grad_sample", None) is not None
        )
        private.optimizer.step()
    return watch.shapes, grad_sample_bytes


def test_ghost_mode_never_materialises_per_sample_gradients() -> None:
    """~2.1M-parameter MLP at batch 256: hooks would hold 256 copies of every weight."""
    torch.manual_seed(6)
    build = lambda: nn.Sequential(  # noqa: E731
        nn.Linear(512, 2048), nn.Tanh(), nn.Linear(2048, 512), nn.Tanh(), nn.Linear(512, 10)
    )
    model = build()
    weights = [p for p in model.parameters() if p.dim() >= 2]
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 2_200_000
    batch = 256
    shapes, grad_sample_bytes = _watched_step(model, "ghost", batch)
    assert grad_sample_bytes == 0
    assert not any((batch, *p.shape) in shapes for p in weights)
    largest = max(torch.Size(s).numel() for s in shapes)
    assert largest < batch * max(p.numel() for p in weights) // 32  # ~ a weight, not 256 of them
    # The same watch sees hooks mode's per-sample gradients (smaller batch: 32 copies, 270 MB).
    shapes, grad_sample_bytes = _watched_step(build(), "hooks", 32)
    assert all((32, *p.shape) in shapes for p in weights)
    assert grad_sample_bytes == 32 * 4 * sum(p.numel() for p in model.parameters())
