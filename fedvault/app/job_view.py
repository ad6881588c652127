"""``fedvault job list``: the coordinator service's jobs and each hospital's ε across them.

The jobs table shows every job of the round store, oldest first, with its place
in the queue. For a role that may read the privacy ledger (auditor and above),
a second table shows each hospital's cumulative ε in each job and summed over
the jobs (sequential composition: a bound on the spend over all of them; the
hospital's own ledger, :mod:`fedvault.client.ledger`, composes its accountants
and refuses a round that would exceed its own cap).
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fedvault.app.operator_client import JobList

__all__ = ["jobs_json", "render_jobs"]


def _rounds(done: int, planned: int | None) -> str:
    return f"{done}/{planned if planned is not None else '?'}"


def render_jobs(jobs: JobList, console: Console) -> None:
    """Print the jobs table, then the ε per hospital (or the role it needs)."""
    table = Table(title="Jobs (oldest first)")
    for column in ("job", "status", "rounds", "queue", "task", "created", "updated"):
        table.add_column(column)
    for j in jobs.jobs:
        table.add_row(
            j.job,
            j.status,
            _rounds(j.rounds_committed, j.rounds_planned),
            str(j.queue_position) if j.queue_position else "",
            j.task,
            j.created_at[:19],
            j.updated_at[:19],
        )
    console.print(table)
    if not jobs.epsilon_visible:
        console.print("ε per hospital across jobs (requires auditor)")
        return
    names = sorted({name for e in jobs.epsilon for name in e.per_job})
    spend = Table(title="ε per hospital: per job (cumulative) and summed over jobs")
    spend.add_column("hospital")
    for name in names:
        spend.add_column(name, justify="right")
    spend.add_column("total ε", justify="right")
    spend.add_column("total δ", justify="right")
    for e in jobs.epsilon:
        cells = [f"{e.per_job[n]:.4f}" if n in e.per_job else "" for n in names]
        delta = "n/a" if e.delta_total is None else f"{e.delta_total:.2g}"
        spend.add_row(e.hospital, *cells, f"{e.total:.4f}", delta)
    console.print(spend)


def jobs_json(jobs: JobList) -> dict[str, object]:
    """``job list --json``: plain dicts; ``epsilon`` is ``None`` when the role may not see it."""
    return {
        "jobs": [j.to_json() for j in jobs.jobs],
        "epsilon": [e.to_json() for e in jobs.epsilon] if jobs.epsilon_visible else None,
    }
