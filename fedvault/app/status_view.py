"""``fedvault status``: readable tables of what the caller's role may see.

One section per operator-API read (job, rounds, participants of the last round,
privacy ledger, audit log). The server's access matrix decides what appears:
:meth:`OperatorClient.access` says up front which sections the role may read,
so a guest's ``status`` does not fill the audit trail with denials; a refusal
that still happens (the matrix changed under us) is caught per section. Either
way the section says which role it needs, e.g. ``(requires auditor)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from fedvault.app.operator_client import (
    Access,
    AuditLog,
    JobStatus,
    OperatorClient,
    OperatorPermissionError,
    PrivacyLedger,
    RoundParticipants,
    RoundSummary,
)

__all__ = ["StatusView", "read_status", "render_status", "status_json"]

_T = TypeVar("_T")
_DETAIL_MAX = 160  # characters of an audit event's JSON detail shown in a row


def _num(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _read(access: Access, method: str, read: Callable[[], _T]) -> _T | str:
    """``read()`` if the role may call ``method``, else the role it needs (a string)."""
    if not access.allows(method):
        required = access.required(method)
        return required.value if required else "another role"
    try:
        return read()
    except OperatorPermissionError as exc:
        return exc.required_role.value if exc.required_role else "another role"


@dataclass(frozen=True)
class StatusView:
    """What ``status`` shows; a section is its data, or the role it needs (a string)."""

    access: Access
    address: str
    job: JobStatus
    rounds: tuple[RoundSummary, ...] | str
    participants: RoundParticipants | str | None  # None: no round yet
    ledger: PrivacyLedger | str
    audit: AuditLog | str


def read_status(client: OperatorClient, *, job: str = "", audit_events: int = 10) -> StatusView:
    """Every section the caller's role may read, in one pass over the operator API.

    Raises the client's :class:`~fedvault.app.operator_client.OperatorApiError` when
    the API is unreachable or the certificate carries no role at all.
    """
    access = client.access()
    status = client.job_status(job)
    name = status.job
    rounds = _read(access, "ListRounds", lambda: client.rounds(name))
    participants: RoundParticipants | str | None = None
    if isinstance(rounds, tuple) and rounds:
        last = rounds[-1].round
        participants = _read(access, "ListParticipants", lambda: client.participants(last, name))
    return StatusView(
        access=access,
        address=client.address,
        job=status,
        rounds=rounds,
        participants=participants,
        ledger=_read(access, "GetPrivacyLedger", lambda: client.privacy_ledger(name)),
        # store-wide: denials are in it too
        audit=_read(access, "GetAuditLog", lambda: client.audit_log(limit=audit_events)),
    )


def _job_table(s: JobStatus) -> Table:
    t = Table(title=f"Job {s.job}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    status = f"{s.status} (paused)" if s.paused else s.status
    planned = "?" if s.rounds_planned is None else str(s.rounds_planned)
    budget = "" if s.epsilon_budget is None else f" of budget {s.epsilon_budget:g}"
    delta = "" if s.delta is None else f" at δ={s.delta:g}"
    t.add_row("status", status)
    if s.task:
        t.add_row("task", s.task)
    t.add_row("rounds", f"{s.rounds_committed} of {planned} committed")
    if s.final_metrics:  # pooled over hospitals: the union of their held-out sets
        for name, value in s.final_metrics.items():
            t.add_row(f"final {name}", _num(value))
    else:
        t.add_row("final accuracy", _num(s.final_accuracy))
        t.add_row("final loss", _num(s.final_loss))
    t.add_row("max ε spent", f"{_num(s.epsilon_max, '.3f')}{budget}{delta}")
    return t


def _rounds_table(rounds: tuple[RoundSummary, ...]) -> Table:
    # A failed attempt (fewer good replies than min_hospitals) is retried with the
    # same model; say so in the title, the rows give each attempt's reason.
    failed = sum(r.status == "failed" for r in rounds)
    retried = f" ({failed} failed attempt{'s' if failed != 1 else ''}, retried)" if failed else ""
    t = Table(title=f"Rounds{retried}")
    for col in ("round", "attempt", "status", "accuracy", "loss", "participants", "failures"):
        t.add_column(col, justify="right")
    t.add_column("reason / committed at")
    for r in rounds:
        t.add_row(
            str(r.round),
            str(r.attempt),
            r.status,
            _num(r.accuracy),
            _num(r.loss),
            str(r.participants),
            str(r.failures),
            r.reason or r.committed_at[:19],
        )
    return t


def _participants_table(p: RoundParticipants) -> Table:
    t = Table(title=f"Participants of round {p.round} (attempt {p.attempt}, {p.round_status})")
    for col in ("hospital", "status", "samples", "train loss", "ε", "eval accuracy", "reason"):
        t.add_column(col, justify="left" if col in ("hospital", "status", "reason") else "right")
    for h in p.participants:
        t.add_row(
            h.hospital,
            h.status,
            str(h.samples),
            _num(h.train_loss),
            _num(h.epsilon, ".3f"),
            _num(h.eval_accuracy),
            h.reason,
        )
    return t


def _ledger_table(ledger: PrivacyLedger) -> Table:
    budget = "" if ledger.epsilon_budget is None else f", budget ε={ledger.epsilon_budget:g}"
    t = Table(title=f"Privacy ledger (latest per hospital{budget})")
    for col in ("hospital", "round", "ε", "δ", "noise σ", "sample rate", "DP steps", "accountant"):
        t.add_column(col, justify="left" if col in ("hospital", "accountant") else "right")
    latest = {e.hospital: e for e in ledger.entries}  # entries come by round, then hospital
    for name in sorted(latest):
        e = latest[name]
        t.add_row(
            name,
            str(e.round),
            f"{e.epsilon:.3f}",
            "n/a" if e.delta is None else f"{e.delta:g}",
            _num(e.noise_multiplier, ".3f"),
            _num(e.sample_rate),
            "n/a" if e.steps is None else str(e.steps),
            e.accountant,
        )
    return t


def _audit_table(log: AuditLog) -> Table:
    chain = (
        "hash chain intact"
        if log.chain_intact
        else f"[bold red]hash chain BROKEN at event {log.first_broken_id}[/bold red]"
    )
    t = Table(title=f"Audit log (newest {len(log.events)} of {log.total}; {chain})")
    rows = [
        (
            str(e.id),
            e.time[:19],
            e.kind,
            e.actor,
            json.dumps(json.loads(e.detail_json), sort_keys=True, ensure_ascii=False),
        )
        for e in log.events
    ]
    for i, col in enumerate(("id", "time", "kind", "actor")):
        width = max((len(r[i]) for r in rows), default=len(col))
        t.add_column(col, justify="right" if col == "id" else "left", min_width=width)
    t.add_column("detail")
    for row in rows:
        detail = row[4] if len(row[4]) <= _DETAIL_MAX else row[4][: _DETAIL_MAX - 1] + "…"
        t.add_row(*row[:4], detail)
    return t


def render_status(
    client: OperatorClient, console: Console, *, job: str = "", audit_events: int = 10
) -> None:
    """Print every section the caller's role may read; name the role the others need.

    Raises the client's :class:`~fedvault.app.operator_client.OperatorApiError` when
    the API is unreachable or the certificate carries no role at all.
    """
    view = read_status(client, job=job, audit_events=audit_events)
    access = view.access
    console.print(
        f"operator [bold]{access.common_name}[/bold] (role {access.role.value}) at {view.address}"
    )
    console.print(_job_table(view.job))
    sections: tuple[tuple[str, object, Callable[[Any], Table]], ...] = (
        ("Rounds", view.rounds, _rounds_table),
        ("Participants", view.participants, _participants_table),
        ("Privacy ledger", view.ledger, _ledger_table),
        ("Audit log", view.audit, _audit_table),
    )
    for title, data, table in sections:
        if isinstance(data, str):
            console.print(f"[bold]{title}[/bold] [dim](requires {data})[/dim]")
        elif data:
            console.print(table(data))


def _jsonable(value: object) -> object:
    """Dataclasses, tuples and mappings as JSON values (an audit detail parsed)."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
        if "detail_json" in out:
            out["detail"] = json.loads(str(out.pop("detail_json")))
        return out
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


def status_json(view: StatusView) -> dict[str, object]:
    """``status --json``: the tables' information under stable keys.

    A section the role may not read is ``null`` and named in ``requires``
    (section -> the least role that may read it); ``participants`` is ``null``
    before the first round too.
    """
    sections = {
        "rounds": view.rounds,
        "participants": view.participants,
        "privacy_ledger": view.ledger,
        "audit_log": view.audit,
    }
    return {
        "operator": {
            "common_name": view.access.common_name,
            "role": view.access.role.value,
            "address": view.address,
        },
        "job": _jsonable(view.job),
        **{k: None if isinstance(v, str) else _jsonable(v) for k, v in sections.items()},
        "requires": {k: v for k, v in sections.items() if isinstance(v, str)},
    }
