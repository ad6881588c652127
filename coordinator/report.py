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

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fedvault.privacy.errors import StoreError

from .records import LedgerRow
from .store import RoundStore

__all__ = ["REPORT_JSON", "REPORT_PNG", "build_report", "summarise", "write_report"]

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
_HOSPITAL_KEYS = (
    "samples",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "accountant",
    "epsilon",
    "delta",
)


def build_report(store: RoundStore, job_name: str) -> dict[str, Any]:
    """Build the report of job ``job_name`` from its committed rounds and ledger.

    Only committed rounds appear in ``"rounds"``, each once and in order; failed
    attempts are not results.
    """
    job = store.get_job(job_name)
    if job is None:
        raise StoreError(
            f"no job {job_name!r} in this store; run it first, or pass the --store that holds it"
        )
    committed = [r for r in store.rounds(job.id) if r.status == "committed"]
    pending = iter(store.ledger(job.id))  # ordered by round
    next_row = next(pending, None)
    latest: dict[str, LedgerRow] = {}
    rounds: list[dict[str, Any]] = []
    hospitals: dict[str, dict[str, Any]] = {}
    for r in committed:
        while next_row is not None and next_row.round <= r.number:
            latest[next_row.hospital] = next_row
            next_row = next(pending, None)
        by_status: dict[str, dict[str, str]] = {"refused": {}, "rejected": {}, "failed": {}}
        for p in r.participations:
            info = hospitals.setdefault(p.hospital, dict.fromkeys(_HOSPITAL_KEYS))
            if p.status == "ok":
                info["samples"] = p.samples
            else:
                by_status[p.status][p.hospital] = p.reason
        rounds.append(
            {
                "round": r.number,
                "accuracy": r.eval_accuracy,
                "loss": r.eval_loss,
                "metrics": dict(r.eval_metrics),
                "hospital_metrics": {e.hospital: dict(e.metrics) for e in r.evaluations},
                "epsilon": {h: latest[h].epsilon for h in sorted(latest)},
                "participants": sorted(p.hospital for p in r.participations if p.status == "ok"),
                **by_status,
                "train_loss": r.train_loss,
                "bytes_received": sum(p.bytes_received for p in r.participations),
            }
        )
    for hospital, row in latest.items():
        hospitals[hospital].update(
            noise_multiplier=row.noise_multiplier,
            sample_rate=row.sample_rate,
            steps=row.steps,
            accountant=row.accountant,
            epsilon=row.epsilon,
            delta=row.delta,
        )
    last = committed[-1] if committed else None
    deltas = [row.delta for row in latest.values() if row.delta is not None]
    final = {
        "accuracy": last.eval_accuracy if last else None,
        "loss": last.eval_loss if last else None,
        "metrics": rounds[-1]["metrics"] if rounds else {},
        "hospital_metrics": rounds[-1]["hospital_metrics"] if rounds else {},
        "epsilon_max": max((row.epsilon for row in latest.values()), default=None),
        "delta": max(deltas, default=None),
        "rounds_completed": len(committed),
        "status": job.status,
    }
    return {
        "config": dict(job.config),
        "rounds": rounds,
        "final": final,
        "hospitals": dict(sorted(hospitals.items())),
    }


def summarise(report: dict[str, Any], *, consortium: str = "") -> dict[str, Any]:
    """The part of a report hospitals keep beside their model versions (model cards).

    Per round only the pooled metrics and each hospital's ε (no participant
    lists or byte counts), so it stays small for a large consortium.
    """
    return {
        "consortium": consortium,
        "job": report["config"].get("job"),
        "task": report["config"].get("task"),
        "rounds": [
            {"round": r["round"], "metrics": r["metrics"], "epsilon": r["epsilon"]}
            for r in report["rounds"]
        ],
        "final": report["final"],
        "hospitals": report["hospitals"],
    }


def write_report(
    store: RoundStore, job_name: str, out_dir: Path, *, report: dict[str, Any] | None = None
) -> Path:
    """Write ``out_dir/report.json`` and ``out_dir/report.png``; return the JSON path.

    ``report``: the job's report if the caller built it already.

    Each file is written to a temporary file in ``out_dir`` and moved into
    place with :func:`os.replace`, so a reader (or a crash) never sees half a
    report: the old one stays until the new one is complete.
    """
    report = report if report is not None else build_report(store, job_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    json_path = out_dir / REPORT_JSON
    _atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))
    _atomic_write(out_dir / REPORT_PNG, lambda f: _plot(report, f))
    return json_path


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _plot(report: dict[str, Any], out: IO[bytes]) -> None:
    """Two panels: the task's pooled test metrics per round; cumulative ε per hospital
    against the target."""
    # Imported here: matplotlib is slow to import and only the report needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # headless Agg, never a GUI backend
    acc_ax, eps_ax = fig.subplots(1, 2)
    rounds = report["rounds"]
    names = sorted({k for r in rounds for k in r.get("metrics", {})} - {"loss"})
    if not names:  # a report without task metrics (written before tasks)
        points = [(r["round"], r["accuracy"]) for r in rounds if r["accuracy"] is not None]
        if points:
            acc_ax.plot(*zip(*points, strict=True), marker="o", label="accuracy")
    for name in names:
        points = [(r["round"], r["metrics"][name]) for r in rounds if name in r["metrics"]]
        acc_ax.plot(*zip(*points, strict=True), marker="o", label=name)
    acc_ax.set(title="Test metrics, pooled over hospitals", xlabel="round", ylabel="value")
    if acc_ax.get_legend_handles_labels()[0]:
        acc_ax.legend(fontsize="small")
    if not {"mae", "rmse"} & set(names):  # classification scores live in [0, 1]
        acc_ax.set_ylim(0.0, 1.02)
    for hospital in report["hospitals"]:
        points = [(r["round"], r["epsilon"][hospital]) for r in rounds if hospital in r["epsilon"]]
        if points:
            eps_ax.plot(*zip(*points, strict=True), marker="o", label=hospital)
    target = report["config"].get("epsilon")
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
