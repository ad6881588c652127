"""The job report: ``report.json`` (a contract, see docs/design.md) and ``report.png``.

Both are derived from the round store alone, so a report can be rebuilt at any
time, by any process that can read the store, and always agrees with it.

Metrics: ``rounds[].metrics`` and ``final.metrics`` are the task's metrics
*pooled* across hospitals (from their confusion counts, score histograms or
error sums; see :mod:`fedvault.metrics`), equal to the metric on the union of
their held-out sets; ``hospital_metrics`` are each hospital's own values
beside them. ``accuracy`` and ``loss`` are kept for classification reports
written before tasks (``accuracy`` is ``None`` for a regression task).

Privacy numbers are cumulative: each hospital's ε for a round is its latest
ledger entry up to that round (carried forward over rounds it sat out), and its
``steps`` are all the DP-SGD steps it took in the job, so
``(noise_multiplier, sample_rate, steps)`` re-derive its final ε.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeGuard

from fedvault.durable import atomic_write
from fedvault.errors import InvalidConfigError, StoreError
from fedvault.json_types import JSONObject, JSONValue

from .records import Job, LedgerRow, RoundView
from .store import RoundStore

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "REPORT_JSON",
    "REPORT_PNG",
    "FinalReport",
    "HospitalPrivacy",
    "JSONObject",
    "JSONValue",
    "Report",
    "ReportBuilder",
    "ReportSummary",
    "RoundReport",
    "SummaryRound",
    "build_report",
    "summarise",
    "write_report",
]

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"

# JSONValue / JSONObject (re-exported here): every ``to_json`` below is built of these.


# -- the report's shape -----------------------------------------------------------
#
# Each class's fields are in the order its JSON keys are written (a contract: see
# docs/design.md). ``from_json`` reads back what ``to_json`` wrote, and also reports
# from before per-round metrics (keys written later default: {} / None / 0).


@dataclass(frozen=True)
class HospitalPrivacy:
    """One hospital of a job.

    Its training samples (latest round it trained in) and its cumulative privacy
    spend; ``None`` where nothing is known (no ledger entry yet).
    """

    samples: int | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    accountant: str | None = None
    epsilon: float | None = None
    delta: float | None = None

    def to_json(self) -> JSONObject:
        """The hospital's entry in ``report.json``'s ``hospitals``."""
        return {
            "samples": self.samples,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "accountant": self.accountant,
            "epsilon": self.epsilon,
            "delta": self.delta,
        }

    @classmethod
    def _read(cls, f: _Fields) -> HospitalPrivacy:
        return cls(
            samples=f.opt_integer("samples"),
            noise_multiplier=f.number("noise_multiplier"),
            sample_rate=f.number("sample_rate"),
            steps=f.opt_integer("steps"),
            accountant=f.opt_text("accountant"),
            epsilon=f.number("epsilon"),
            delta=f.number("delta"),
        )


@dataclass(frozen=True)
class RoundReport:
    """One committed round.

    The pooled and per-hospital metrics of its evaluation, each hospital's
    cumulative ε, who trained, who did not and why, and the bytes received.
    """

    round: int
    accuracy: float | None = None
    loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    hospital_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    epsilon: Mapping[str, float] = field(default_factory=dict)
    participants: tuple[str, ...] = ()
    refused: Mapping[str, str] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)
    train_loss: float | None = None
    bytes_received: int = 0

    def to_json(self) -> JSONObject:
        """The round's entry in ``report.json``'s ``rounds``."""
        return {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "metrics": dict(self.metrics),
            "hospital_metrics": {h: dict(m) for h, m in self.hospital_metrics.items()},
            "epsilon": dict(self.epsilon),
            "participants": list(self.participants),
            "refused": dict(self.refused),
            "rejected": dict(self.rejected),
            "failed": dict(self.failed),
            "train_loss": self.train_loss,
            "bytes_received": self.bytes_received,
        }

    @classmethod
    def _read(cls, f: _Fields) -> RoundReport:
        return cls(
            round=f.integer("round"),
            accuracy=f.number("accuracy"),
            loss=f.number("loss"),
            metrics=f.numbers("metrics"),
            hospital_metrics=f.tables("hospital_metrics"),
            epsilon=f.numbers("epsilon", required=True),
            participants=f.names("participants"),
            refused=f.texts("refused"),
            rejected=f.texts("rejected"),
            failed=f.texts("failed"),
            train_loss=f.number("train_loss"),
            bytes_received=f.integer("bytes_received", default=0),
        )


@dataclass(frozen=True)
class FinalReport:
    """The job's end (so far).

    The last committed round's evaluation, the largest ε and δ any hospital spent,
    how many rounds were committed, and the job's status.
    """

    accuracy: float | None
    loss: float | None
    metrics: Mapping[str, float]
    hospital_metrics: Mapping[str, Mapping[str, float]]
    epsilon_max: float | None
    delta: float | None
    rounds_completed: int
    status: str

    def to_json(self) -> JSONObject:
        """The ``final`` object of ``report.json``."""
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "metrics": dict(self.metrics),
            "hospital_metrics": {h: dict(m) for h, m in self.hospital_metrics.items()},
            "epsilon_max": self.epsilon_max,
            "delta": self.delta,
            "rounds_completed": self.rounds_completed,
            "status": self.status,
        }

    @classmethod
    def _read(cls, f: _Fields) -> FinalReport:
        return cls(
            accuracy=f.number("accuracy"),
            loss=f.number("loss"),
            metrics=f.numbers("metrics"),
            hospital_metrics=f.tables("hospital_metrics"),
            epsilon_max=f.number("epsilon_max"),
            delta=f.number("delta"),
            rounds_completed=f.integer("rounds_completed"),
            status=f.text("status"),
        )


@dataclass(frozen=True)
class Report:
    """The contents of ``report.json``.

    The job's stored configuration, its committed rounds in order, its end, and
    its hospitals by name.
    """

    config: Mapping[str, JSONValue]
    rounds: tuple[RoundReport, ...]
    final: FinalReport
    hospitals: Mapping[str, HospitalPrivacy]

    def to_json(self) -> JSONObject:
        """The ``report.json`` object, keys in the order they are written."""
        return {
            "config": dict(self.config),
            "rounds": [r.to_json() for r in self.rounds],
            "final": self.final.to_json(),
            "hospitals": {name: h.to_json() for name, h in self.hospitals.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Report:
        """Read a report back (``json.loads`` of ``report.json``).

        Raises :class:`InvalidConfigError` naming the key that is missing or of the
        wrong type; keys it does not know are ignored.
        """
        f = _Fields(data, REPORT_JSON)
        return cls(
            config=f.json_object("config"),
            rounds=tuple(RoundReport._read(r) for r in f.objects("rounds")),
            final=FinalReport._read(f.obj("final")),
            hospitals={n: HospitalPrivacy._read(h) for n, h in f.members("hospitals").items()},
        )


@dataclass(frozen=True)
class SummaryRound:
    """One round in a job summary: pooled metrics, each listed hospital's ε, the largest ε."""

    round: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    epsilon: Mapping[str, float] = field(default_factory=dict)
    epsilon_max: float | None = None

    def to_json(self) -> JSONObject:
        """The round's entry in the summary's ``rounds``."""
        return {
            "round": self.round,
            "metrics": dict(self.metrics),
            "epsilon": dict(self.epsilon),
            "epsilon_max": self.epsilon_max,
        }


@dataclass(frozen=True)
class ReportSummary:
    """The compact report the coordinator relays to hospitals with the final model.

    See :func:`summarise`; they keep it beside their model versions.
    """

    consortium: str
    job: str | None
    task: str | None
    rounds: tuple[SummaryRound, ...]
    final: FinalReport
    hospitals: Mapping[str, HospitalPrivacy]
    hospitals_not_listed: int = 0

    def to_json(self) -> JSONObject:
        """The summary as a JSON object, as hospitals keep it."""
        return {
            "consortium": self.consortium,
            "job": self.job,
            "task": self.task,
            "rounds": [r.to_json() for r in self.rounds],
            "final": self.final.to_json(),
            "hospitals": {name: h.to_json() for name, h in self.hospitals.items()},
            "hospitals_not_listed": self.hospitals_not_listed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ReportSummary:
        """Read a relayed summary back; errors as :meth:`Report.from_json`."""
        f = _Fields(data, "job summary")
        return cls(
            consortium=f.opt_text("consortium") or "",
            job=f.opt_text("job"),
            task=f.opt_text("task"),
            rounds=tuple(
                SummaryRound(
                    round=r.integer("round"),
                    metrics=r.numbers("metrics"),
                    epsilon=r.numbers("epsilon"),
                    epsilon_max=r.number("epsilon_max"),
                )
                for r in f.objects("rounds")
            ),
            final=FinalReport._read(f.obj("final")),
            hospitals={n: HospitalPrivacy._read(h) for n, h in f.members("hospitals").items()},
            hospitals_not_listed=f.integer("hospitals_not_listed", default=0),
        )


class _Fields:
    """One JSON object being read back; an error names the path of the offending key."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"{where} must be a JSON object (got {_kind(data)})")
        self._data: Mapping[str, object] = data
        self._where = where

    def _get(self, key: str, *, required: bool) -> object:
        if key not in self._data and required:
            raise InvalidConfigError(f"{self._where} lacks {key!r}")
        return self._data.get(key)

    def _wrong(self, key: str, what: str, value: object) -> InvalidConfigError:
        return InvalidConfigError(f"{self._where}: {key!r} must be {what} (got {_kind(value)})")

    def integer(self, key: str, *, default: int | None = None) -> int:
        value = self._get(key, required=default is None)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer", value)
        return value

    def opt_integer(self, key: str) -> int | None:
        value = self._get(key, required=False)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise self._wrong(key, "an integer or null", value)

    def number(self, key: str) -> float | None:
        value = self._get(key, required=False)
        if value is None or _is_number(value):
            return value
        raise self._wrong(key, "a number or null", value)

    def text(self, key: str) -> str:
        value = self._get(key, required=True)
        if not isinstance(value, str):
            raise self._wrong(key, "a string", value)
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, required=False)
        if value is None or isinstance(value, str):
            return value
        raise self._wrong(key, "a string or null", value)

    def numbers(self, key: str, *, required: bool = False) -> dict[str, float]:
        value = self._get(key, required=required)
        if value is None and not required:
            return {}
        if not isinstance(value, Mapping) or not all(_is_number(v) for v in value.values()):
            raise self._wrong(key, "an object of numbers", value)
        return dict(value)

    def texts(self, key: str) -> dict[str, str]:
        value = self._get(key, required=False)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise self._wrong(key, "an object of strings", value)
        return dict(value)

    def tables(self, key: str) -> dict[str, dict[str, float]]:
        value = self._get(key, required=False)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self._wrong(key, "an object of objects of numbers", value)
        inner = _Fields(value, f"{self._where}.{key}")
        return {name: inner.numbers(name, required=True) for name in value}

    def names(self, key: str) -> tuple[str, ...]:
        value = self._get(key, required=True)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._wrong(key, "a list of strings", value)
        return tuple(value)

    def json_object(self, key: str) -> dict[str, JSONValue]:
        value = self._get(key, required=True)
        if not isinstance(value, Mapping):
            raise self._wrong(key, "an object", value)
        return dict(value)

    def obj(self, key: str) -> _Fields:
        return _Fields(self._get(key, required=True), f"{self._where}.{key}")

    def objects(self, key: str) -> list[_Fields]:
        value = self._get(key, required=True)
        if not isinstance(value, list):
            raise self._wrong(key, "a list of objects", value)
        return [_Fields(v, f"{self._where}.{key}[{i}]") for i, v in enumerate(value)]

    def members(self, key: str) -> dict[str, _Fields]:
        value = self._get(key, required=True)
        if not isinstance(value, Mapping):
            raise self._wrong(key, "an object of objects", value)
        return {n: _Fields(v, f"{self._where}.{key}[{n!r}]") for n, v in value.items()}


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _text_or_none(value: JSONValue) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


def build_report(store: RoundStore, job_name: str) -> Report:
    """Build the report of job ``job_name`` from its committed rounds and ledger.

    Only committed rounds appear in ``rounds``, each once and in order; failed
    attempts are not results.
    """
    return ReportBuilder(store, job_name).build()


@dataclass
class _Folded:
    """What the rounds folded so far leave for the next: each hospital's state."""

    rounds: list[RoundReport] = field(default_factory=list)
    latest: dict[str, LedgerRow] = field(default_factory=dict)  # hospital -> newest ledger row
    samples: dict[str, int | None] = field(default_factory=dict)  # of the last round it trained

    def copy(self) -> _Folded:
        return _Folded(list(self.rounds), dict(self.latest), dict(self.samples))

    def fold(
        self, r: RoundView, ledger: Iterator[LedgerRow], pending: LedgerRow | None
    ) -> LedgerRow | None:
        """Add committed round ``r``; consumes ``ledger`` up to it, returns its first later row."""
        while pending is not None and pending.round <= r.number:
            self.latest[pending.hospital] = pending
            pending = next(ledger, None)
        by_status: dict[str, dict[str, str]] = {"refused": {}, "rejected": {}, "failed": {}}
        for p in r.participations:
            self.samples.setdefault(p.hospital, None)
            if p.status == "ok":
                self.samples[p.hospital] = p.samples
            else:
                by_status[p.status][p.hospital] = p.reason
        self.rounds.append(
            RoundReport(
                round=r.number,
                accuracy=r.eval_accuracy,
                loss=r.eval_loss,
                metrics=dict(r.eval_metrics),
                hospital_metrics={e.hospital: dict(e.metrics) for e in r.evaluations},
                epsilon={h: self.latest[h].epsilon for h in sorted(self.latest)},
                participants=tuple(
                    sorted(p.hospital for p in r.participations if p.status == "ok")
                ),
                refused=by_status["refused"],
                rejected=by_status["rejected"],
                failed=by_status["failed"],
                train_loss=r.train_loss,
                bytes_received=sum(p.bytes_received for p in r.participations),
            )
        )
        return pending


class ReportBuilder:
    """Builds one job's report again after each round, reading only what may have changed.

    The first :meth:`build` reads the whole job, as :func:`build_report` does; each
    later one reads only the rounds and ledger rows after the second-newest
    committed round of the build before, and the job's row (its status). That
    suits the coordinator running the job: between builds it commits a round,
    records the evaluation of the round before it (or, at the end, of the
    last), and nothing else changes a committed round. The report is the one
    :func:`build_report` would build from the same store.

    Parameters
    ----------
    store
        The round store holding the job.
    job_name
        The job's name.
    """

    def __init__(self, store: RoundStore, job_name: str) -> None:
        self._store, self._job_name = store, job_name
        # Committed rounds up to ``_after`` are final: folded into ``_done`` once.
        self._after = 0
        self._done = _Folded()
        #: The newest committed round as the last :meth:`build` read it (``None``: none yet).
        self.newest: RoundView | None = None

    def build(self) -> Report:
        """The job's report as the store has it now.

        Raises
        ------
        StoreError
            The store holds no such job.
        """
        job = self._store.get_job(self._job_name)
        if job is None:
            raise StoreError(
                f"no job {self._job_name!r} in this store; run it first, or pass the --store "
                "that holds it"
            )
        rounds = self._store.rounds(job.id, after=self._after)
        fresh = [r for r in rounds if r.status == "committed"]
        ledger = iter(self._store.ledger(job.id, after=self._after))  # ordered by round
        pending = next(ledger, None)
        # All but the newest are final and folded for good; the newest is folded on a
        # copy: its evaluation comes with the next commit.
        for r in fresh[:-1]:
            pending = self._done.fold(r, ledger, pending)
            self._after = r.number
        folded = self._done.copy()
        for r in fresh[-1:]:
            folded.fold(r, ledger, pending)
            self.newest = r
        return _report(job, folded)


def _report(job: Job, folded: _Folded) -> Report:
    """The report of ``job`` once all of its committed rounds are folded."""
    rounds, latest = folded.rounds, folded.latest
    hospitals = {h: HospitalPrivacy(samples=n) for h, n in folded.samples.items()}
    for hospital, row in latest.items():
        hospitals[hospital] = replace(
            hospitals[hospital],
            noise_multiplier=row.noise_multiplier,
            sample_rate=row.sample_rate,
            steps=row.steps,
            accountant=row.accountant,
            epsilon=row.epsilon,
            delta=row.delta,
        )
    last = rounds[-1] if rounds else None
    deltas = [row.delta for row in latest.values() if row.delta is not None]
    final = FinalReport(
        accuracy=last.accuracy if last else None,
        loss=last.loss if last else None,
        metrics=last.metrics if last else {},
        hospital_metrics=last.hospital_metrics if last else {},
        epsilon_max=max((row.epsilon for row in latest.values()), default=None),
        delta=max(deltas, default=None),
        rounds_completed=len(rounds),
        status=job.status,
    )
    return Report(
        config=dict(job.config),
        rounds=tuple(rounds),
        final=final,
        hospitals=dict(sorted(hospitals.items())),
    )


SUMMARY_LISTS_UP_TO = 100
"""Largest consortium whose summary lists every hospital's privacy spend."""


def summarise(
    report: Report, *, consortium: str = "", lists_up_to: int = SUMMARY_LISTS_UP_TO
) -> ReportSummary:
    """The part of a report hospitals keep beside their model versions (model cards).

    Per round only the pooled metrics, each hospital's ε and the largest ε (no
    participant lists or byte counts). Every hospital receives the summary with
    every round's instruction, so above ``lists_up_to`` hospitals (a simulation,
    in practice) the per-hospital entries (ε, DP parameters, final metrics) are
    left out and only the largest ε per round and at the end are kept: listed,
    the relay would grow with the consortium at every hospital, i.e. with its
    square in all (1.3 MB per hospital and round at 5,000 hospitals). The
    coordinator's ``report.json`` keeps everything.
    """
    listed = len(report.hospitals) <= lists_up_to
    return ReportSummary(
        consortium=consortium,
        job=_text_or_none(report.config.get("job")),
        task=_text_or_none(report.config.get("task")),
        rounds=tuple(
            SummaryRound(
                round=r.round,
                metrics=r.metrics,
                epsilon=r.epsilon if listed else {},
                epsilon_max=max(r.epsilon.values(), default=None),
            )
            for r in report.rounds
        ),
        final=report.final if listed else replace(report.final, hospital_metrics={}),
        hospitals=report.hospitals if listed else {},
        hospitals_not_listed=0 if listed else len(report.hospitals),
    )


def write_report(
    store: RoundStore, job_name: str, out_dir: Path, *, report: Report | None = None
) -> Path:
    """Write ``out_dir/report.json`` and ``out_dir/report.png``; return the JSON path.

    ``report``: the job's report if the caller built it already.

    Each file is written with :func:`fedvault.durable.atomic_write` (mode 0644:
    a report is meant to be shared), so a reader (or a crash) never sees half a
    report: the old one stays until the new one is complete and on disk.
    """
    report = report if report is not None else build_report(store, job_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"
    json_path = out_dir / REPORT_JSON
    atomic_write(json_path, text, 0o644)
    png = io.BytesIO()
    _plot(report, png)
    atomic_write(out_dir / REPORT_PNG, png.getvalue(), 0o644)
    return json_path


def _plot(report: Report, out: IO[bytes]) -> None:
    """Draw the report's figure into ``out`` as a PNG.

    Two panels: the task's pooled test metrics per round; cumulative ε per hospital
    against the target.
    """
    # Imported here: matplotlib is slow to import and only the report needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # headless Agg, never a GUI backend
    acc_ax, eps_ax = fig.subplots(1, 2)
    rounds = report.rounds
    names = sorted({k for r in rounds for k in r.metrics} - {"loss"})
    if not names:  # a report without task metrics (written before tasks)
        acc = [(r.round, r.accuracy) for r in rounds if r.accuracy is not None]
        if acc:
            acc_ax.plot(*zip(*acc, strict=True), marker="o", label="accuracy")
    for name in names:
        points = [(r.round, r.metrics[name]) for r in rounds if name in r.metrics]
        acc_ax.plot(*zip(*points, strict=True), marker="o", label=name)
    acc_ax.set(title="Test metrics, pooled over hospitals", xlabel="round", ylabel="value")
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend(fontsize="small")
    if not {"mae", "rmse"} & set(names):  # classification scores live in [0, 1]
        acc_ax.set_ylim(0.0, 1.02)
    _plot_epsilon(eps_ax, report)
    target = report.config.get("epsilon")
    if isinstance(target, int | float) and not isinstance(target, bool):
        eps_ax.axhline(target, linestyle="--", color="black", label=f"target ε = {target:g}")
    eps_ax.set(title="Privacy spent per hospital", xlabel="round", ylabel="ε (cumulative)")
    if eps_ax.get_legend_handles_labels()[0]:
        eps_ax.legend(fontsize="small")
    eps_ax.set_ylim(bottom=0.0)
    for ax in (acc_ax, eps_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
    fig.savefig(out, format="png", dpi=100)


PLOT_EACH_UP_TO = 12
"""Largest consortium whose ε plot has a line (and a legend entry) per hospital."""


def _plot_epsilon(ax: Axes, report: Report) -> None:
    """Cumulative ε per round: a line per hospital, or for a large consortium its range.

    A thousand lines and legend entries are unreadable (and took seconds to draw
    every round); above :data:`PLOT_EACH_UP_TO` hospitals the plot shows the
    largest, median and smallest ε of each round, the range shaded.
    """
    if len(report.hospitals) <= PLOT_EACH_UP_TO:
        for hospital in report.hospitals:
            spent = [(r.round, r.epsilon[hospital]) for r in report.rounds if hospital in r.epsilon]
            if spent:
                ax.plot(*zip(*spent, strict=True), marker="o", label=hospital)
        return
    spent_rounds = [r for r in report.rounds if r.epsilon]
    if not spent_rounds:
        return
    xs = [r.round for r in spent_rounds]
    values = [sorted(r.epsilon.values()) for r in spent_rounds]
    low, high = [v[0] for v in values], [v[-1] for v in values]
    ax.fill_between(
        xs, low, high, alpha=0.25, label=f"range over {len(report.hospitals)} hospitals"
    )
    ax.plot(xs, high, marker="o", label="largest")
    ax.plot(xs, [v[len(v) // 2] for v in values], marker=".", label="median")
    ax.plot(xs, low, marker="o", label="smallest")
