"""Durable rounds under real crashes: ``kill -9`` of a ``fedvault simulate`` and re-running it.

Each crash is injected by a test-only ``sitecustomize`` hook (:data:`KILL_HOOK`)
inside the simulate process: at a chosen point of a chosen round it SIGKILLs its
own process group — the coordinator *and* every Ray process it started — exactly
as an operator's ``kill -9`` of the group would, but at a point the test
controls instead of one a polling loop happens to catch. The same command is
then re-run on the same ``--out`` and must resume, not start over.

Crash points (all with ``--rounds 4 --seed 3``; run B is the uninterrupted reference):

* A — round 3, replies received, not committed: every hospital has trained and
  booked round 3, so the resumed run must *replay* those updates (no second
  ledger entry, no second privacy spend) and end on B's model and B's epsilons.
* C — the same point in round 1, before any commit: the stored initial model
  (round 0) is re-sent byte for byte, so hospitals replay round 1 too.

The min_hospitals tests run the Python API in a child process (Ray stays out of
pytest) with hospital-3's ledger already spent by an earlier study on the same
data, so it refuses every round.

All seven processes run concurrently (each killed run is re-run the moment it
dies): a simulate run is mostly Ray and worker start-up, ~40 s of wall clock
alone on 2 cores, so one after the other would take ~5 min.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedvault.client.ledger import LedgerEntry, LocalLedger
from fedvault.coordinator.records import AuditRow, LedgerRow, RoundView
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.privacy.dp import AccountantState

pytestmark = pytest.mark.e2e

HOSPITALS, ROUNDS, SEED = 3, 4, 3
JOB = f"breast-cancer-{HOSPITALS}h-{ROUNDS}r-seed{SEED}"
NAMES = [f"hospital-{i}" for i in range(1, HOSPITALS + 1)]
MODULE_TIMEOUT_S = 480  # all runs together; ~2.5 min on 2 cores

KILL_ENV, MARK_ENV = "FEDVAULT_TEST_KILL_AT", "FEDVAULT_TEST_KILL_MARK"

#: Test-only ``sitecustomize``: in the ``fedvault simulate`` process only (never in
#: Ray's workers), ``$FEDVAULT_TEST_KILL_AT = "POINT:ROUND"`` SIGKILLs the process
#: group when POINT is reached for ROUND, after writing ``$FEDVAULT_TEST_KILL_MARK``.
#: collect_train: the round's replies arrived (every hospital trained) and were
#: collected (RoundCollector.finish), before the commit. record_evaluation: called
#: with ROUND, i.e. just after ROUND + 1 committed;
#: no test uses it (two more runs would not fit the time budget), but adding
#: ``"D": "record_evaluation:1"`` to SCENARIOS reproduces a lost round-1 evaluation.
KILL_HOOK = """\
import os
import signal
import sys

_AT = os.environ.get("FEDVAULT_TEST_KILL_AT")
if _AT and "simulate" in getattr(sys, "orig_argv", ()):
    _POINT, _, _ROUND = _AT.partition(":")

    def _die(point, number):
        if number != int(_ROUND):
            return
        with open(os.environ["FEDVAULT_TEST_KILL_MARK"], "w") as f:
            f.write(f"{point}:{number}")
        os.killpg(os.getpgrp(), signal.SIGKILL)

    if _POINT == "collect_train":
        # The ServerApp folds replies into a RoundCollector as they arrive; finish()
        # is where the round's replies are all in and the commit comes next.
        from fedvault.coordinator.strategy import RoundCollector

        _orig = RoundCollector.finish

        def _finish(self, *args, **kwargs):
            _die("collect_train", self.server_round)
            return _orig(self, *args, **kwargs)

        RoundCollector.finish = _finish
    elif _POINT == "record_evaluation":
        from fedvault.coordinator.store import RoundStore

        _orig = RoundStore.record_evaluation

        def _record(self, job_id, number, *args, **kwargs):
            _die("record_evaluation", number)
            return _orig(self, job_id, number, *args, **kwargs)

        RoundStore.record_evaluation = _record
"""

#: Where each scenario's first run is killed (see :data:`KILL_HOOK`).
SCENARIOS = {"A": "collect_train:3", "C": "collect_train:1"}

BUDGET_JOB = "breast-cancer-3h-2r-seed5"
#: The min_hospitals runs: the Python API, in a child so Ray never starts in pytest.
BUDGET_SCRIPT = """\
import sys
from pathlib import Path

from fedvault.config import JobConfig
from fedvault.examples import get_example
from fedvault.errors import FedvaultError
from fedvault.app.simulation import simulate

out, min_hospitals = Path(sys.argv[1]), int(sys.argv[2])
# Unmasked: a masked round of three hospitals cannot lose the refusing one (docs/secagg.md).
config = JobConfig.for_example(
    get_example("breast-cancer"), hospitals=3, rounds=2, seed=5, min_hospitals=min_hospitals,
    masking=False,
)
try:
    report = simulate(config, out_dir=out)
except FedvaultError as exc:
    print(f"JOB-ERROR {type(exc).__name__}: {exc}")
    sys.exit(3)
print("JOB-STATUS", report["final"]["status"])
"""


# ---- processes --------------------------------------------------------------------------


@dataclass
class Run:
    """One child process in its own session, its output in files (no pipe can fill up)."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    started: float
    seconds: float = 0.0
    left_behind: tuple[str, ...] = ()  # command lines still in its session after it exited

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def explain(self) -> str:
        err = self.stderr_path.read_text(errors="replace")
        return f"{self.name}: exit {self.proc.returncode}\n{self.stdout[-3000:]}\n{err[-3000:]}"


def _session_members(sid: int) -> tuple[int, ...]:
    """Live (non-zombie) processes of session ``sid``: the run and every Ray process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and os.getsid(int(entry)) == sid:
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return tuple(found)


def _kill_session(sid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _start(name: str, argv: Sequence[str], logs: Path, env: dict[str, str] | None = None) -> Run:
    out, err = logs / f"{name}.stdout", logs / f"{name}.stderr"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            list(argv), stdout=fo, stderr=fe, env={**os.environ, "COLUMNS": "200", **(env or {})},
            start_new_session=True,
        )  # fmt: skip
    return Run(name, proc, out, err, time.monotonic())


def _reap(run: Run) -> None:
    """After ``run`` exited: note what its session still holds, then kill that.

    After a SIGKILL of the group only zombies can remain; after a normal exit Ray's
    daemons notice their parent is gone and leave by themselves, within seconds.
    """
    run.seconds = time.monotonic() - run.started
    deadline = time.monotonic() + 2.0
    while (left := _session_members(run.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    run.left_behind = tuple(_cmdline(pid) for pid in left)
    _kill_session(run.proc.pid)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid} (gone)"


def _simulate_argv(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "fedvault", "simulate", "--example", "breast-cancer",
        "--hospitals", str(HOSPITALS), "--rounds", str(ROUNDS), "--seed", str(SEED),
        "--out", str(out),
    ]  # fmt: skip


def _spend_hospital_3(out: Path) -> None:
    """An earlier study on hospital-3's data already spent far more than this job's 3.0."""
    path = out / "hospitals" / "hospital-3" / "ledger.sqlite"
    with LocalLedger(path, hospital="hospital-3") as ledger:
        spent = AccountantState("prv", ((1.0, 1.0, 20),))
        ledger.record_round(job="earlier-study", server_round=1, state=spent, delta=1e-5)
        assert ledger.spent(delta=1e-5) > 3.0


# ---- reading the results ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Everything a (possibly resumed) run left on disk."""

    report: dict[str, Any]
    job_status: str
    rounds: list[RoundView]
    store_ledger: list[LedgerRow]
    audit: list[AuditRow]
    audit_broken_at: int | None
    ledgers: dict[str, list[LedgerEntry]]  # each hospital's own ledger, this job's entries

    @property
    def booked(self) -> dict[str, list[tuple[int, int]]]:
        """(round, attempt) of every training run each hospital booked."""
        return {h: [(e.server_round, e.attempt) for e in es] for h, es in self.ledgers.items()}


def _hospital_ledgers(out: Path, job: str) -> dict[str, list[LedgerEntry]]:
    found = {}
    for name in NAMES:
        path = out / "hospitals" / name / "ledger.sqlite"
        if path.exists():
            with LocalLedger(path, hospital=name) as ledger:
                found[name] = ledger.entries(job)
    return found


def _committed(out: Path, job: str) -> list[int]:
    with RoundStore(sqlite_url(out / DEFAULT_STORE_FILENAME)) as store:
        row = store.get_job(job)
        assert row is not None, f"no job {job!r} in {out}"
        return [v.number for v in store.rounds(row.id) if v.status == "committed"]


def _outcome(out: Path, job: str) -> Outcome | None:
    """What ``out`` holds; ``None`` when the run got no report written (see its log)."""
    if not (out / "report.json").exists():
        return None
    with RoundStore(sqlite_url(out / DEFAULT_STORE_FILENAME)) as store:
        row = store.get_job(job)
        assert row is not None, f"no job {job!r} in {out}"
        return Outcome(
            report=json.loads((out / "report.json").read_text()),
            job_status=row.status,
            rounds=store.rounds(row.id),
            store_ledger=store.ledger(row.id),
            audit=store.audit_events(row.id),
            audit_broken_at=store.verify_audit_chain(),
            ledgers=_hospital_ledgers(out, job),
        )


# ---- all runs, concurrently -------------------------------------------------------------


@dataclass(frozen=True)
class Crash:
    """A run the hook killed, and what the kill left on disk."""

    run: Run
    marker: str  # "POINT:ROUND" the hook wrote just before killing
    committed: list[int]
    booked: dict[str, list[tuple[int, int]]]


@dataclass(frozen=True)
class Runs:
    runs: dict[str, Run]  # every process, by name
    crashes: dict[str, Crash]  # by scenario
    outcomes: dict[str, Outcome | None]  # B, each scenario after its resumed run, min2, min3

    def outcome(self, name: str) -> Outcome:
        found = self.outcomes[name]
        run = self.runs.get(f"{name}-resumed", self.runs.get(name))
        assert found is not None, run.explain() if run else name
        return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Every process this module needs; each killed run is re-run the moment it dies."""
    root = tmp_path_factory.mktemp("resume")
    logs, hook = root / "logs", root / "hook"
    logs.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    live = [_start("B", _simulate_argv(root / "B"), logs)]
    for name, point in SCENARIOS.items():
        env = {"PYTHONPATH": pythonpath, KILL_ENV: point, MARK_ENV: str(root / f"{name}.mark")}
        live.append(_start(f"{name}-killed", _simulate_argv(root / name), logs, env))
    for quorum in (2, 3):
        out = root / f"min{quorum}"
        _spend_hospital_3(out)
        argv = [sys.executable, "-c", BUDGET_SCRIPT, str(out), str(quorum)]
        live.append(_start(f"min{quorum}", argv, logs))
    done: dict[str, Run] = {}
    crashes: dict[str, Crash] = {}
    try:
        while live:
            if time.monotonic() - started > MODULE_TIMEOUT_S:
                pytest.fail(
                    f"still running after {MODULE_TIMEOUT_S} s: {[r.name for r in live]}\n"
                    + "\n".join(r.explain() for r in live)
                )
            for run in [r for r in live if r.proc.poll() is not None]:
                live.remove(run)
                _reap(run)
                done[run.name] = run
                if run.name.endswith("-killed"):
                    name = run.name.removesuffix("-killed")
                    mark = root / f"{name}.mark"
                    crashes[name] = Crash(
                        run,
                        mark.read_text() if mark.exists() else "",
                        _committed(root / name, JOB),
                        {
                            h: [(e.server_round, e.attempt) for e in es]
                            for h, es in _hospital_ledgers(root / name, JOB).items()
                        },
                    )
                    live.append(_start(f"{name}-resumed", _simulate_argv(root / name), logs))
            time.sleep(0.2)
    finally:
        for run in live:
            _kill_session(run.proc.pid)
    timing = f"{len(done)} processes in {time.monotonic() - started:.0f} s: " + ", ".join(
        f"{r.name} {r.seconds:.0f} s" for r in done.values()
    )
    lingering = {r.name: r.left_behind for r in done.values() if r.left_behind}
    (logs / "timing.txt").write_text(f"{timing}\nstill running 2 s after exit: {lingering}\n")
    print("\n" + timing)
    outcomes = {name: _outcome(root / name, JOB) for name in ("B", *SCENARIOS)}
    outcomes |= {f"min{q}": _outcome(root / f"min{q}", BUDGET_JOB) for q in (2, 3)}
    yield Runs(done, crashes, outcomes)


# ---- kill -9 and resume -----------------------------------------------------------------

FULL = {h: [(n, 1) for n in range(1, ROUNDS + 1)] for h in NAMES}  # each round booked once


def test_kill_hook_fired_and_left_no_process(runs: Runs) -> None:
    for name, crash in runs.crashes.items():
        assert crash.run.proc.returncode == -signal.SIGKILL, crash.run.explain()
        assert crash.marker == SCENARIOS[name], crash.run.explain()
        # kill -9 of the process group takes Ray's raylet, GCS and workers with it.
        assert crash.run.left_behind == ()


def test_killed_between_replies_and_commit_of_round_3(runs: Runs) -> None:
    crash = runs.crashes["A"]
    # The crash hit where replay matters: round 3 trained and booked everywhere, not committed.
    assert crash.committed == [1, 2]
    assert crash.booked == {h: [(1, 1), (2, 1), (3, 1)] for h in NAMES}


def test_resumed_run_says_so_and_finishes(runs: Runs) -> None:
    run = runs.runs["A-resumed"]
    assert run.proc.returncode == 0, run.explain()
    assert f"Resuming job '{JOB}' after committed round 2 of {ROUNDS}" in run.stdout
    a = runs.outcome("A")
    assert a.job_status == "finished" and a.report["final"]["status"] == "finished"
    assert a.report["final"]["rounds_completed"] == ROUNDS


def test_each_round_committed_exactly_once(runs: Runs) -> None:
    a = runs.outcome("A")
    assert [(v.number, v.status, v.attempt) for v in a.rounds] == [
        (n, "committed", 1) for n in range(1, ROUNDS + 1)
    ]
    assert [r["round"] for r in a.report["rounds"]] == list(range(1, ROUNDS + 1))
    committed = [e.detail["round"] for e in a.audit if e.kind == "round.committed"]
    assert committed == list(range(1, ROUNDS + 1))
    resumed = [e.detail for e in a.audit if e.kind == "job_resumed"]
    assert [{k: d[k] for k in ("after_round", "mode")} for d in resumed] == [
        {"after_round": 2, "mode": "he"}
    ]
    started = [e.detail for e in a.audit if e.kind == "job_started"]
    # The restart runs the very task the job started with (same fingerprint).
    assert resumed[0]["task_fingerprint"] == started[0]["task_fingerprint"]
    assert a.audit_broken_at is None


def test_no_epsilon_counted_twice_or_lost(runs: Runs) -> None:
    a = runs.outcome("A")
    # Round 3 was replayed from what each hospital had already released: no second entry.
    assert a.booked == FULL
    for name, entries in a.ledgers.items():
        per_round = {e.steps for e in entries}
        assert len(per_round) == 1 and min(per_round) >= 1
        assert a.report["hospitals"][name]["steps"] == ROUNDS * per_round.pop()
        eps = [e.epsilon for e in entries]
        assert eps == sorted(eps) and eps[0] > 0  # cumulative
        assert a.report["hospitals"][name]["epsilon"] == pytest.approx(eps[-1], rel=1e-12)
    # The coordinator's ledger: one row per (hospital, round), equal to the hospital's own.
    rows = {(r.hospital, r.round): r.epsilon for r in a.store_ledger}
    assert len(rows) == len(a.store_ledger) == HOSPITALS * ROUNDS
    for name, entries in a.ledgers.items():
        for e in entries:
            assert rows[(name, e.server_round)] == pytest.approx(e.epsilon, rel=1e-12)


def test_resumed_model_matches_uninterrupted_run(runs: Runs) -> None:
    a, b = runs.outcome("A"), runs.outcome("B")
    assert runs.runs["B"].proc.returncode == 0 and b.job_status == "finished"
    assert b.booked == FULL
    # Epsilon depends only on (noise, sample rate, steps): bit-for-bit equal.
    for name in NAMES:
        assert a.report["hospitals"][name] == b.report["hospitals"][name]
    for ra, rb in zip(a.report["rounds"], b.report["rounds"], strict=True):
        assert ra["epsilon"] == rb["epsilon"]
        # Same seeds and data, and the encrypted path is exact up to a deterministic
        # fixed-point rounding: all 114 test predictions are identical.
        assert ra["accuracy"] == rb["accuracy"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
    assert a.report["final"]["accuracy"] == b.report["final"]["accuracy"] >= 0.9


def test_killed_before_first_commit_does_not_spend_twice(runs: Runs) -> None:
    crash = runs.crashes["C"]
    assert crash.committed == []
    assert crash.booked == {h: [(1, 1)] for h in NAMES}
    c = runs.outcome("C")
    assert c.booked == FULL
    assert runs.runs["C-resumed"].proc.returncode == 0, runs.runs["C-resumed"].explain()
    assert c.report["final"]["accuracy"] == runs.outcome("B").report["final"]["accuracy"]


# ---- min_hospitals: refusals and failed rounds -----------------------------------------


def test_round_proceeds_with_min_hospitals_when_one_refuses(runs: Runs) -> None:
    run, o = runs.runs["min2"], runs.outcome("min2")
    assert run.proc.returncode == 0 and "JOB-STATUS finished" in run.stdout, run.explain()
    assert o.job_status == "finished"
    assert [(v.number, v.status, v.attempt) for v in o.rounds] == [
        (1, "committed", 1),
        (2, "committed", 1),
    ]
    for r in o.report["rounds"]:
        assert sorted(r["participants"]) == ["hospital-1", "hospital-2"]
        assert list(r["refused"]) == ["hospital-3"]
        assert "BudgetExhaustedError" in r["refused"]["hospital-3"]
        assert set(r["epsilon"]) == {"hospital-1", "hospital-2"}
    refused = [(e.actor, e.detail["round"]) for e in o.audit if e.kind == "round_refused"]
    assert refused == [("hospital-3", 1), ("hospital-3", 2)]
    # hospital-3 never trained for this job.
    assert o.booked == {"hospital-1": [(1, 1), (2, 1)], "hospital-2": [(1, 1), (2, 1)],
                        "hospital-3": []}  # fmt: skip
    assert {r.hospital for r in o.store_ledger} == {"hospital-1", "hospital-2"}
    assert o.report["final"]["accuracy"] >= 0.85


def test_round_below_min_hospitals_fails_then_job_fails(runs: Runs) -> None:
    run, o = runs.runs["min3"], runs.outcome("min3")
    # The job ends "failed" and simulate() returns its report (no exception).
    assert run.proc.returncode == 0 and "JOB-STATUS failed" in run.stdout, run.explain()
    assert o.job_status == "failed" and o.report["final"]["status"] == "failed"
    # Only budget refusals: a spent budget does not come back, so one failed
    # attempt of round 1 ends the job instead of max_round_attempts (3).
    assert [(v.number, v.status, v.attempt) for v in o.rounds] == [(1, "failed", 1)]
    for v in o.rounds:
        assert "2 of 3 required hospitals contributed" in v.reason
        assert "hospital-3 refused: BudgetExhaustedError" in v.reason
    failed = [e.detail for e in o.audit if e.kind == "round.failed"]
    assert [(d["round"], d["attempt"]) for d in failed] == [(1, 1)]
    for d in failed:
        assert d["statuses"] == {"hospital-1": "ok", "hospital-2": "ok", "hospital-3": "refused"}
    assert o.report["rounds"] == []
    assert o.store_ledger == []
    assert o.booked == {"hospital-1": [(1, 1)], "hospital-2": [(1, 1)], "hospital-3": []}
    assert o.audit_broken_at is None
