"""An empirical privacy audit: test the accountant's ε against a trained model.

``fedvault audit privacy`` trains a job with inserted canary records and turns
a membership-inference test on the trained model into a lower bound on ε at a
confidence level, by one-run auditing (Steinke, Nasr and Jagielski, NeurIPS
2023; the statistics are :mod:`fedvault.privacy.audit`). The accountant's ε
claims the job is (ε, δ)-DP; the claim survives the audit when the lower
bound stays at or below it. With the noise switched off (``dp=False``) or
far below the plan (``noise_scale``) the same audit must find a bound above
the claim: that is what shows the audit can fail.

What is trained, and why it is a fair test of fedvault's guarantee
------------------------------------------------------------------
fedvault promises record-level DP at each hospital: every update that leaves
a hospital is the output of DP-SGD on that hospital's records, accounted over
the whole job. The audit runs that hospital, in process: a one-hospital job
(``JobConfig.for_task(hospitals=1)``: the task's batch size, learning rate,
local epochs and clipping norm, the job's rounds), its noise planned by
:func:`~fedvault.privacy.dp.plan_dp` for the actual number of records, each
round trained by :func:`~fedvault.client.training.train_private` on a fresh
model loaded with the previous round's weights and continuing the job's
accountant state: what a hospital's ClientApp does. Nothing is
re-implemented. In a one-hospital job the aggregate *is* the hospital's
update, so the auditor sees exactly what the coordinator would; with more
hospitals the others' updates are independent of the canaries and can only
hide them (post-processing), so one hospital is the strongest place to test.
Flower's runtime and the BFV encryption are left out: they carry the update,
they do not change it (up to fixed-point rounding), and the decrypted
aggregate is the next global model every party sees. The DP noise and the
Poisson batches are drawn as ``train_private`` draws them by default (the
CSPRNG of a deployed hospital), so ``seed`` does not fix them.

Canaries
--------
``m`` canaries, each in the hospital's training data with probability 1/2
(independent fair coins from ``numpy.random.default_rng(seed)``), with a
random label. The auditor scores every canary by minus the task's loss on it
under the final model (a black-box membership test on the released model),
guesses "in" for the highest scores and "out" for the lowest, and bounds ε
from the count of correct guesses (:func:`~fedvault.privacy.audit.best_lower_bound`).

Each canary gets an input coordinate of its own: the model is the task's
model plus a zero-initialised, bias-free linear "canary head" over ``m``
extra input columns (zero for every real record; ``canary_scale`` at the
canary's own column, zero features elsewhere). Without it a one-run audit of
a small model cannot have teeth: every per-sample gradient of the
breast-cancer model (30 features, two logits) lies in one 31-dimensional
subspace, so past ~31 canaries their effects on the weights overlap, while
31 all-correct guesses refute only ε ≈ 2.29 at 95% (62 are needed to reach
ε = 3). Measured: 1000 far-out canaries with random labels on the
unmodified model, DP off, give a bound of at most 0.01. The head gives
every canary an unshared direction (the
"Dirac canary" of the paper's white-box audit, reached here through ordinary
input records), so DP-SGD without noise memorises every included canary.
The guarantee being tested does not depend on the model: DP-SGD's (ε, δ)
holds for any model and loss, for the planned noise, sample rate and steps;
the head makes each canary as visible as clipping allows, a harder test of
the same guarantee, not a different one.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedvault.errors import InvalidConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedvault.config import JobConfig
    from fedvault.privacy.dp import AccountantState, DpPlan
    from fedvault.task import Task

__all__ = [
    "CITATION",
    "NO_DP_NOISE",
    "AuditSettings",
    "PrivacyAuditResult",
    "run_privacy_audit",
    "write_outputs",
]

#: The noise multiplier of a run "with DP off": DP-SGD refuses 0, and 1e-9 of
#: the clipping norm is no noise at all next to a clipped gradient.
NO_DP_NOISE = 1e-9
#: Where the lower bound comes from.
CITATION = (
    "Steinke, Nasr and Jagielski, Privacy Auditing with One (1) Training Run, "
    "NeurIPS 2023, arXiv:2305.08846: main theorem for (eps, delta)-DP, "
    "P[W >= v] <= f(v) + 2 m delta max_i (f(v-i) - f(v))/i, "
    "f(v) = P[Binomial(r, e^eps/(1+e^eps)) >= v]"
)
_MAX_CANARIES = 100_000


@dataclass(frozen=True, kw_only=True)
class AuditSettings:
    """What to audit, and how hard.

    Parameters
    ----------
    task
        An installed task's name or ``module:attribute`` (a classification
        task with flat feature vectors).
    epsilon, delta
        The job's privacy target: the plan's noise is chosen to spend ε at δ.
    rounds
        Federated rounds of the job (the default of ``fedvault simulate``).
    canaries
        ``m``: canaries drawn, each included with probability 1/2.
    confidence
        Confidence level of the lower bound.
    seed
        Seeds the coins, the canaries and the model's initialisation (not the
        DP noise: see the module docstring).
    dp
        ``False``: train with (practically) no noise, clipping kept.
    noise_scale
        Multiplies the planned noise multiplier (1: the plan; 0.01: noise far
        below it). Ignored when ``dp`` is off.
    canary_scale
        The value at a canary's own input column.
    """

    task: str = "breast-cancer"
    epsilon: float = 3.0
    delta: float = 1e-5
    rounds: int = 10
    canaries: int = 1000
    confidence: float = 0.95
    seed: int = 0
    dp: bool = True
    noise_scale: float = 1.0
    canary_scale: float = 3.0

    def __post_init__(self) -> None:
        """Check every setting by name before anything is trained."""
        c = self.canaries
        if not isinstance(c, int) or isinstance(c, bool) or not 2 <= c <= _MAX_CANARIES:
            raise InvalidConfigError(
                f"canaries must be an integer from 2 to {_MAX_CANARIES} (got {c!r}), e.g. 1000"
            )
        if not _number(self.confidence) or not 0 < self.confidence < 1:
            raise InvalidConfigError(
                f"confidence must be a number with 0 < confidence < 1 (got {self.confidence!r})"
            )
        for name in ("noise_scale", "canary_scale"):
            value = getattr(self, name)
            if not _number(value) or not math.isfinite(value) or value <= 0:
                raise InvalidConfigError(f"{name} must be a finite number > 0 (got {value!r})")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InvalidConfigError(f"seed must be an integer >= 0 (got {self.seed!r})")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class PrivacyAuditResult:
    """The audit's outcome; :meth:`to_dict` is what ``privacy-audit.json`` holds."""

    task: str
    settings: dict[str, Any]
    claimed_epsilon: float  # the accountant's ε for the planned job
    delta: float
    lower_bound: float  # the empirical lower bound on ε at ``confidence``
    confidence: float
    holds: bool  # lower_bound <= claimed_epsilon
    canaries: int
    included: int
    guesses: int  # of the best rule
    correct: int
    rules: list[dict[str, float]]
    records: int  # training records of the hospital (real + included canaries)
    planned_noise_multiplier: float
    noise_multiplier: float  # what the run used
    sample_rate: float
    steps: int
    run_epsilon: float | None  # the accountant's ε for the run (None: it left the plan)
    scores_in: list[float] = field(repr=False)
    scores_out: list[float] = field(repr=False)
    wall_s: float = 0.0
    statement: str = CITATION

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (the scores included, for re-analysis)."""
        return asdict(self)


class _CanaryModel:
    """Builds the audited model: the task's model plus a canary head (see the module doc)."""

    def __init__(self, task: Task, features: int, canaries: int) -> None:
        self.task, self.features, self.canaries = task, features, canaries

    def build(self) -> nn.Module:
        from torch import nn

        features = self.features

        class WithCanaryHead(nn.Module):
            def __init__(self, base: nn.Module, head: nn.Linear) -> None:
                super().__init__()
                self.base, self.head = base, head

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.base(x[:, :features]) + self.head(x[:, features:])

        head = nn.Linear(self.canaries, self.task.num_outputs, bias=False)
        nn.init.zeros_(head.weight)
        return WithCanaryHead(self.task.build_model(), head)


def _features(task: Task, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's reference training data as one ``(n, features)`` tensor and its labels."""
    import torch
    from torch.utils.data import DataLoader

    if not task.is_classification:
        raise InvalidConfigError(
            f"task {task.name!r} is a {task.kind} task; the privacy audit needs labelled "
            "canaries (a binary or multiclass task)"
        )
    if task.load_data is None:
        raise InvalidConfigError(
            f"task {task.name!r} has no reference data set (load_data) to audit on"
        )
    train, _ = task.load_data(seed)
    x, y = next(iter(DataLoader(train, batch_size=len(train))))  # type: ignore[arg-type]
    if x.dim() != 2 or not x.is_floating_point():
        raise InvalidConfigError(
            f"task {task.name!r} has features of shape {tuple(x.shape[1:])}; the privacy "
            "audit supports tasks whose records are flat vectors of real features"
        )
    return x, torch.as_tensor(y, dtype=torch.int64)


def _canary_scores(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Minus the task's loss on each canary under ``model`` (higher: looks trained on)."""
    import torch

    criterion = task.criterion()
    model.eval()
    with torch.no_grad():
        losses = [float(criterion(model(x[i : i + 1]), y[i : i + 1])) for i in range(len(y))]
    return -np.asarray(losses, dtype=np.float64)


def _train_seed(seed: int, server_round: int) -> int:
    return (seed * 1_000_003 + server_round * 7919) % 2**31


@dataclass(frozen=True)
class _Canaries:
    """The drawn canaries and the hospital's training data with the included ones."""

    included: np.ndarray  # (m,) bool: the coins
    x: torch.Tensor  # (m, features + m)
    y: torch.Tensor  # (m,)
    data: TensorDataset  # real records (padded with zeros) + the included canaries


def _draw_canaries(settings: AuditSettings, task: Task) -> _Canaries:
    import torch
    from torch.utils.data import TensorDataset

    x, y = _features(task, settings.seed)
    m, num_features = settings.canaries, x.shape[1]
    rng = np.random.default_rng(settings.seed)
    included = rng.random(m) < 0.5  # one fair coin per canary
    canary_y = torch.as_tensor(rng.integers(0, task.num_classes, m), dtype=torch.int64)
    canary_x = torch.cat([torch.zeros(m, num_features), settings.canary_scale * torch.eye(m)], 1)
    keep = torch.as_tensor(included)
    data = TensorDataset(
        torch.cat([torch.cat([x, torch.zeros(len(x), m)], 1), canary_x[keep]]),
        torch.cat([y, canary_y[keep]]),
    )
    return _Canaries(included=included, x=canary_x, y=canary_y, data=data)


def _train_job(
    job: JobConfig, task: Task, builder: _CanaryModel, data: TensorDataset, plan: DpPlan
) -> tuple[nn.Module, AccountantState]:
    """The hospital's rounds: fresh model, previous weights, train_private, accountant carried."""
    import torch

    from fedvault.client.training import train_private
    from fedvault.privacy.dp import AccountantState

    torch.manual_seed(job.seed)
    weights = builder.build().state_dict()
    state = AccountantState(job.privacy.accountant)
    batch_size = min(job.training.batch_size, len(data))
    for server_round in range(1, job.rounds + 1):
        model = builder.build()  # a fresh model each round, as a hospital's ClientApp does
        model.load_state_dict(weights)
        result = train_private(
            model,
            data,
            task=task,
            training=job.training,
            max_grad_norm=job.privacy.max_grad_norm,
            batch_size=batch_size,
            plan=plan,
            state=state,
            device=torch.device("cpu"),
            seed=_train_seed(job.seed, server_round),
        )
        state, weights = result.state, model.state_dict()
    final = builder.build()
    final.load_state_dict(weights)
    return final, state


def run_privacy_audit(settings: AuditSettings, out_dir: Path | None = None) -> PrivacyAuditResult:
    """Train the canary job, test membership, bound ε; write ``out_dir`` when given.

    ``out_dir`` receives ``privacy-audit.json`` (:meth:`PrivacyAuditResult.to_dict`)
    and ``privacy-audit.png`` (the canaries' scores, in against out).

    Raises
    ------
    InvalidConfigError
        For a bad setting, a task the audit cannot handle, or a budget the
        plan cannot reach.
    """
    with warnings.catch_warnings():
        # Opacus' notes do not apply here: "Secure RNG turned off" (fedvault draws
        # noise from its own CSPRNG), "Full backward hook is firing" (inputs need
        # no gradient), "Optimal order is the largest alpha" (RDP, still an upper bound).
        warnings.filterwarnings("ignore", category=UserWarning, module=r"opacus(\.|$)")
        return _audit(settings, out_dir)


def _audit(settings: AuditSettings, out_dir: Path | None) -> PrivacyAuditResult:
    from fedvault.config import JobConfig
    from fedvault.privacy.audit import best_lower_bound
    from fedvault.privacy.dp import DpPlan, compute_epsilon, plan_dp
    from fedvault.task_registry import load_task

    started = time.perf_counter()
    task = load_task(settings.task).task
    job = JobConfig.for_task(
        task,
        hospitals=1,
        rounds=settings.rounds,
        epsilon=settings.epsilon,
        delta=settings.delta,
        secure_aggregation="none",
        seed=settings.seed,
    )
    canaries = _draw_canaries(settings, task)
    n = len(canaries.data)
    plan = plan_dp(
        job.privacy,
        num_samples=n,
        batch_size=min(job.training.batch_size, n),
        local_epochs=job.training.local_epochs,
        rounds=job.rounds,
    )
    delta = job.privacy.delta
    claimed = compute_epsilon(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.total_steps,
        delta=delta,
        accountant=job.privacy.accountant,
    )
    noise = plan.noise_multiplier * settings.noise_scale if settings.dp else NO_DP_NOISE
    run_plan = DpPlan(
        noise_multiplier=noise,
        sample_rate=plan.sample_rate,
        steps_per_round=plan.steps_per_round,
        rounds=plan.rounds,
    )
    if out_dir is not None:  # every setting is checked: nothing is written on bad input
        _prepare_out(out_dir)
    builder = _CanaryModel(task, canaries.x.shape[1] - settings.canaries, settings.canaries)
    model, state = _train_job(job, task, builder, canaries.data, run_plan)
    scores = _canary_scores(model, task, canaries.x, canaries.y)
    included = canaries.included
    bound = best_lower_bound(scores, included, delta=delta, confidence=settings.confidence)
    audit = PrivacyAuditResult(
        task=task.name,
        settings=asdict(settings),
        claimed_epsilon=claimed,
        delta=delta,
        lower_bound=bound.epsilon,
        confidence=bound.confidence,
        holds=bound.epsilon <= claimed,
        canaries=bound.canaries,
        included=int(included.sum()),
        guesses=bound.best.guesses,
        correct=bound.best.correct,
        rules=[
            {"in": g.k_in, "out": g.k_out, "correct": g.correct, "lower_bound": b}
            for g, b in bound.rules
        ],
        records=n,
        planned_noise_multiplier=plan.noise_multiplier,
        noise_multiplier=noise,
        sample_rate=plan.sample_rate,
        steps=state.steps,
        run_epsilon=state.epsilon(delta) if noise == plan.noise_multiplier else None,
        scores_in=[float(s) for s in scores[included]],
        scores_out=[float(s) for s in scores[~included]],
        wall_s=time.perf_counter() - started,
    )
    if out_dir is not None:
        write_outputs(audit, out_dir)
    return audit


def _prepare_out(out_dir: Path) -> None:
    """Fail before training, not after it, when ``out_dir`` cannot hold the results."""
    import tempfile

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InvalidConfigError(
            f"--out {out_dir} is not usable ({reason}): choose another"
        ) from exc


def write_outputs(result: PrivacyAuditResult, out_dir: Path) -> None:
    """``privacy-audit.json`` and ``privacy-audit.png`` in ``out_dir`` (created if needed)."""
    from fedvault.durable import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False)
    atomic_write(out_dir / "privacy-audit.json", text + "\n", mode=0o644)
    with open(out_dir / "privacy-audit.png", "wb") as png:
        _plot(result, png)


def _plot(result: PrivacyAuditResult, out: Any) -> None:
    """The canaries' scores, included against left out, with the verdict in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)  # headless Agg, never a GUI backend
    ax = fig.subplots()
    both = np.asarray(result.scores_in + result.scores_out)
    bins: list[float] | int = (
        np.linspace(both.min(), both.max(), 41).tolist() if np.ptp(both) > 0 else 10
    )
    ax.hist(result.scores_out, bins=bins, alpha=0.6, label=f"left out ({len(result.scores_out)})")
    ax.hist(result.scores_in, bins=bins, alpha=0.6, label=f"trained on ({len(result.scores_in)})")
    noise = "DP off" if not result.settings["dp"] else f"noise σ = {result.noise_multiplier:.3g}"
    ax.set(
        title=(
            f"{result.task}, {noise}: ε ≥ {result.lower_bound:.2f} "
            f"({result.confidence:.0%}) vs accountant ε = {result.claimed_epsilon:.2f}"
        ),
        xlabel="canary score (minus its loss under the trained model)",
        ylabel="canaries",
    )
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(out, format="png", dpi=100)
