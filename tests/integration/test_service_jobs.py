"""The coordinator as a service: several jobs, one after another, on real processes.

A coordinator daemon started *without* a job and three hospital daemons (TLS on
127.0.0.1). Three jobs go in through ``fedvault job submit`` (the operator API):
two 1-round jobs run one after the other on the same SuperLink and hospitals,
and a third, stopped while still queued, never starts. Afterwards the
coordinator still answers ``fedvault status``, every job keeps its own rows and
report, a guest cannot submit, and ``fedvault job list`` shows each hospital's ε
in each job and summed over them, which must equal the sum of the store's
per-job ledgers; each hospital's own ledger composes the two jobs as well, under
its own cap over all jobs (``--epsilon-budget``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedvault.app.demo import JOB_NAME, prepare_consortium
from fedvault.client.ledger import LocalLedger
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.flower_env import spawn, terminate_tree

pytestmark = pytest.mark.e2e

NAMES = ("hospital-1", "hospital-2", "hospital-3")
SECOND, HELD = "second-job", "held-job"
#: Each hospital's own ε cap over all jobs. Without one a hospital checks the
#: composed spend against the job's ε (3 here) and refuses the second job.
BUDGET = 10.0
TIMEOUT_S = int(os.environ.get("FEDVAULT_TEST_SERVICE_TIMEOUT_S", "420"))  # 2 loaded cores


def _fedvault(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *args], capture_output=True, text=True, timeout=120
    )


def _until(predicate: Callable[[], bool], timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {p.name} ---\n{p.read_text(errors='replace')[-2500:]}"
                for p in sorted(logs.glob("*.log"))
            )
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.5)


def _statuses(store_url: str) -> dict[str, str]:
    with contextlib.suppress(Exception), RoundStore(store_url) as store:
        return {j.name: j.status for j in store.list_jobs()}
    return {}


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_a_coordinator_service_runs_queued_jobs_one_after_another(
    tmp_path: Path, processes_mentioning: Callable[[Path], dict[int, str]]
) -> None:
    paths = prepare_consortium(tmp_path, hospitals=3, rounds=1, epsilon=3.0, masking=False)
    first = paths["job"].read_text()
    jobs = {JOB_NAME: paths["job"]}
    for name, seed in ((SECOND, 1), (HELD, 2)):
        jobs[name] = tmp_path / f"{name}.toml"
        jobs[name].write_text(first.replace(JOB_NAME, name).replace("seed = 0", f"seed = {seed}"))
    operator = str(paths["kits"] / "operators" / "operator")  # admin
    visitor = str(paths["kits"] / "operators" / "visitor")  # guest
    state, logs = paths["state"], tmp_path / "logs"
    logs.mkdir()
    store_url = sqlite_url(state / DEFAULT_STORE_FILENAME)
    hospital_state = {n: tmp_path / "hospital-state" / n for n in NAMES}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started = time.monotonic()

    def left() -> float:
        return TIMEOUT_S - (time.monotonic() - started)

    def enrolled() -> bool:
        with contextlib.suppress(Exception), RoundStore(store_url) as store:
            return sum(e.kind == "node_enrolled" for e in store.audit_events()) >= len(NAMES)
        return False

    try:
        procs["coordinator"] = spawn(
            [sys.executable, "-m", "fedvault", "coordinator", "start",
             "--kit", str(paths["kits"] / "coordinator"), "--state", str(state)],
            env=dict(os.environ), log_path=logs / "coordinator.log",
        )  # fmt: skip
        _until(enrolled, left(), "the coordinator to enrol the hospitals", logs)
        for name in NAMES:
            procs[name] = spawn(
                [sys.executable, "-m", "fedvault", "client", "start",
                 "--kit", str(paths["kits"] / "hospitals" / name),
                 "--data", str(paths["data"] / name / "data.toml"),
                 "--policy", str(paths["data"] / name / "policy.toml"),
                 "--state", str(hospital_state[name]), "--epsilon-budget", str(BUDGET)],
                env=dict(os.environ), log_path=logs / f"{name}.log",
            )  # fmt: skip

        # Three jobs through the CLI; the third is stopped while two jobs wait before it.
        for name, path in jobs.items():
            done = _fedvault("job", "submit", str(path), "--kit", operator)
            assert done.returncode == 0, done.stderr
            assert f"job {name} queued" in done.stdout
        stopped = _fedvault("job", "stop", HELD, "--kit", operator, "--reason", "not today")
        assert stopped.returncode == 0, stopped.stderr
        assert f"job {HELD}: stopped" in stopped.stdout
        denied = _fedvault("job", "submit", str(jobs[SECOND]), "--kit", visitor)
        assert denied.returncode != 0
        assert "role guest may not submit a job" in denied.stderr

        def both_ended() -> bool:
            now = _statuses(store_url)
            return all(now.get(n) in ("finished", "failed") for n in (JOB_NAME, SECOND))

        _until(both_ended, left(), "both jobs to end", logs)
        time.sleep(3)  # an idle queue: the stopped job must stay stopped

        assert procs["coordinator"].poll() is None, "the service must outlive its jobs"
        for name in NAMES:
            assert procs[name].poll() is None, f"{name} must keep serving across jobs"
        status = _fedvault("status", "--kit", operator, "--job", SECOND)
        assert status.returncode == 0, status.stderr
        listed = _fedvault("job", "list", "--kit", operator, "--json")
        assert listed.returncode == 0, listed.stderr
        table = _fedvault("job", "list", "--kit", operator)
        assert table.returncode == 0 and "total ε" in table.stdout, table.stdout
    finally:
        coordinator = procs.get("coordinator")
        if coordinator is not None and coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)  # the service's normal end
            with contextlib.suppress(subprocess.TimeoutExpired):
                coordinator.wait(timeout=30)
        for proc in reversed(list(procs.values())):
            terminate_tree(proc, grace=10.0)
        for pid in processes_mentioning(tmp_path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    assert procs["coordinator"].returncode == 0, (logs / "coordinator.log").read_text()[-3000:]

    out = json.loads(listed.stdout)
    by_name = {j["job"]: j for j in out["jobs"]}
    assert [j["job"] for j in out["jobs"]] == [JOB_NAME, SECOND, HELD]  # oldest first
    assert [(by_name[n]["status"], by_name[n]["rounds_committed"]) for n in by_name] == [
        ("finished", 1),
        ("finished", 1),
        ("stopped", 0),
    ], out["jobs"]
    assert all(j["queue_position"] == 0 for j in out["jobs"])

    # Each job has its own rows, report and ledger; the ε across jobs is their sum.
    with RoundStore(store_url) as store:
        rows = {n: store.get_job(n) for n in by_name}
        ledgers = {n: store.ledger(job.id) for n, job in rows.items() if job is not None}
        held_rounds = store.rounds(rows[HELD].id) if rows[HELD] else None
        events = {e.kind for e in store.audit_events(rows[JOB_NAME].id)}  # type: ignore[union-attr]
    assert held_rounds == [] and ledgers[HELD] == []
    assert "job_started" in events
    per_job = {
        n: {r.hospital: r.epsilon for r in ledgers[n] if r.round == 1} for n in (JOB_NAME, SECOND)
    }
    assert all(set(spend) == set(NAMES) for spend in per_job.values())
    spend = {e["hospital"]: e for e in out["epsilon"]}
    assert set(spend) == set(NAMES)
    for name in NAMES:
        assert spend[name]["per_job"] == pytest.approx({n: per_job[n][name] for n in per_job})
        assert spend[name]["total"] == pytest.approx(
            per_job[JOB_NAME][name] + per_job[SECOND][name]
        )
        # The hospital's own ledger holds both jobs and composes them (no looser than the sum).
        with LocalLedger(hospital_state[name] / "ledger.sqlite", hospital=name) as own:
            composed = own.spent(delta=1e-5)
            assert {e.job for e in own.entries()} == {JOB_NAME, SECOND}
        assert max(per_job[n][name] for n in per_job) < composed
        assert composed <= min(spend[name]["total"], BUDGET) + 1e-9

    for name in (JOB_NAME, SECOND):
        report = json.loads((state / "reports" / name / "report.json").read_text())
        assert report["config"]["job"] == name
        assert [r["round"] for r in report["rounds"]] == [1]
    latest = json.loads((state / "report.json").read_text())
    assert latest["config"]["job"] == SECOND  # STATE/report.json: the latest job's
