"""Soak: a large consortium on loopback, end to end, with the production coordinator.

``make soak`` runs ``python -m bench.soak`` (default: 100 hospitals, 50 rounds).
It is not part of ``make test``.

What runs, all real processes on 127.0.0.1:

* the coordinator exactly as deployed: ``fedvault coordinator start`` (round
  store, ``flower-superlink`` with TLS, node authentication and its database,
  the Fleet gateway, node enrolment, the operator API, and the job submitted
  with ``flwr run`` so Flower starts our ServerApp, strategy and store commits);
* one ``flower-supernode`` per hospital, each with its own provisioned kit and
  enrolled node key, dialling the gateway over TLS, with the same node config
  as ``fedvault client start`` (kit, data, state directory);
* one shared SuperExec (:mod:`bench.soak_executor`) that runs every hospital's
  ClientApp tasks; each task is still a separate process running Flower's
  ``run_clientapp`` against that hospital's SuperNode (see that module for why
  it forks instead of exec'ing ``flwr-clientapp``).

The job is the smallest example (breast-cancer logistic regression) with
DP-SGD and BFV encryption on; each hospital holds ``--records`` rows drawn
from the example's training split (hospitals overlap: the soak is about the
coordinator, not the model).

Output: a progress display, a result table, ``OUT/soak.png`` (seconds per round,
coordinator memory over time: :mod:`bench.soak_plot`) and ``OUT/soak.json``: rounds
committed and failed, coordinator peak RSS (SuperLink, ServerApp, gateway,
daemon; sampled from ``/proc``), committed rounds read back from the store,
wall time and per-round median/p95 (also written after every round, so a run
cut short still reports). Every process is stopped at the end, on error and on
Ctrl-C; the soak stops itself if free memory falls under ``MIN_FREE_MB``.

Sizing, measured on the 2-core / 24 GiB development box: a SuperNode holds
~140 MB RSS (100: ~14 GB); a ClientApp task costs ~0.4-0.8 CPU-s with the
forking SuperExec (vs ~3.6 s of imports alone per fresh ``flwr-clientapp``).
Enrolment is one Control API connection for all keys (seconds for 100).
Hospitals start ``--start-interval`` apart (default 1 s; at 0.5 s, a burst of
SuperNodes importing Flower at once timed out some activations). With
100 hospitals the machine is mostly busy being the hospitals: idle, the
SuperLink takes ~0.45 of a core answering 100 SuperNodes' 3-second polls, the
SuperNodes and this executor ~0.5 (the executor asks every node's Runtime API
for work once a second, as Flower's SuperExec does), the gateway ~0.12, so a
round of 100 one-epoch tasks takes ~2 min (10 hospitals: ~12 s).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.soak_plot import plot_soak
from fedvault.client.supernode import SuperNodeConfig, SuperNodeSupervisor
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.errors import FedvaultError
from fedvault.flower_env import (
    descendants,
    flower_env,
    free_port,
    process_children,
    spawn,
    terminate_tree,
)

__all__ = ["main", "run_soak"]

EXAMPLE = "breast-cancer"
ENROL_STALL_S = 180.0
MIN_FREE_MB = 1024  # stop the soak cleanly rather than let the kernel pick victims


def _names(hospitals: int) -> list[str]:
    width = len(str(hospitals))
    return [f"hospital-{i + 1:0{width}d}" for i in range(hospitals)]


def prepare(work: Path, *, hospitals: int, rounds: int, records: int, seed: int) -> dict[str, Path]:
    """Kits, one small CSV data set per hospital, and the job file."""
    import numpy as np

    from fedvault.app.demo import provision_loopback, write_hospital_data
    from fedvault.examples import get_example

    names = _names(hospitals)
    provision_loopback(work, "soak-consortium", names, {"operator": "admin"})
    train, test = get_example(EXAMPLE).load_data(seed)
    x_train, y_train = (t.numpy() for t in train.tensors)  # type: ignore[attr-defined]
    x_test, y_test = (t.numpy() for t in test.tensors)  # type: ignore[attr-defined]
    n_test = max(8, records // 4)
    for i, name in enumerate(names):
        rng = np.random.default_rng(seed * 100_003 + i)
        tr = rng.choice(len(y_train), size=min(records, len(y_train)), replace=False)
        te = rng.choice(len(y_test), size=min(n_test, len(y_test)), replace=False)
        write_hospital_data(
            work / "data" / name,
            (x_train[tr], y_train[tr]),
            (x_test[te], y_test[te]),
            min_records=min(20, records),
        )
    job = work / "job.toml"
    job.write_text(
        f'[job]\nname = "soak-{hospitals}h-{rounds}r"\nexample = "{EXAMPLE}"\n'
        f"hospitals = {hospitals}\nrounds = {rounds}\nepsilon = 3.0\nseed = {seed}\n"
        "local_epochs = 1\n"
        # A lost reply costs a whole timeout; 100 hospitals' tasks take ~1-2 min here.
        "round_timeout_s = 300\n"
        # Hospital-side CPU: each task evaluates its ledger three times, 0.35 CPU-s
        # each with PRV (0.1 with RDP); 100 hospitals share these two cores.
        'accountant = "rdp"\n'
    )
    return {"kits": work / "kits", "data": work / "data", "job": job, "state": work / "coordinator"}


# --- memory sampling (/proc; psutil is not a dependency) ------------------------


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    return [root, *descendants(root, children)]


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> tuple[float, float]:
    """(own user+system, reaped children's user+system) CPU seconds of ``pid``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv).decode(errors="replace")
    for needle, role in (
        ("flower-superlink", "superlink"),
        ("flwr-serverapp", "serverapp"),
        ("flower-superexec", "superexec"),
        ("fleet_gateway", "gateway"),
        ("fedvault coordinator", "daemon"),
        ("supernode_entry", "supernode"),
        ("bench.soak_executor", "executor"),
    ):
        if needle in text:
            return role
    return "other"  # e.g. a `flwr` CLI call, a forked ClientApp task


@dataclass
class MemorySampler:
    """Peak RSS of the coordinator's process tree (per role and in total) and the hospitals'."""

    interval: float = 1.0
    coordinator_pid: int | None = None
    hospital_pids: set[int] = field(default_factory=set)
    peak_mb: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    # CPU seconds per process (last value seen), and of the daemon's reaped children
    cpu: dict[int, tuple[str, float]] = field(default_factory=dict)
    reaped_cpu_s: float = 0.0
    # (seconds since start, coordinator MB, hospitals MB) per sample, for the plot
    series: list[tuple[float, float, float]] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)
    _last: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def current(self, key: str) -> float:
        return self._last.get(key, 0.0)

    def sample(self) -> None:
        children = process_children()
        now: dict[str, float] = {}
        if self.coordinator_pid is not None:
            total = 0
            for pid in _tree(self.coordinator_pid, children):
                rss = _rss_kb(pid)
                role = "coordinator." + _role(pid)
                now[role] = now.get(role, 0.0) + rss / 1024
                total += rss
                own, reaped = _cpu_s(pid)
                if own and role != "coordinator.other":  # `flwr` calls: counted once reaped
                    self.cpu[pid] = (role, own)
                if pid == self.coordinator_pid:
                    self.reaped_cpu_s = reaped  # its `flwr` CLI calls
            now["coordinator.total"] = total / 1024
        hospitals = 0
        for root in list(self.hospital_pids):
            for pid in _tree(root, children):
                hospitals += _rss_kb(pid)
                own, _ = _cpu_s(pid)
                if own and pid in self.hospital_pids:  # forked tasks: the executor counts them
                    self.cpu[pid] = ("hospitals." + _role(pid), own)
        now["hospitals.total"] = hospitals / 1024
        for key, value in now.items():
            self.peak_mb[key] = max(self.peak_mb.get(key, 0.0), value)
        self._last = now
        self.samples += 1
        self.series.append(
            (
                round(time.monotonic() - self._t0, 1),
                round(now.get("coordinator.total", 0.0), 1),
                round(now["hospitals.total"], 1),
            )
        )

    def thinned_series(self, most: int = 600) -> list[tuple[float, float, float]]:
        """At most ``most`` samples, evenly spaced, the last one kept (soak.json stays small)."""
        step = max(1, -(-len(self.series) // most))
        out = self.series[::step]
        if out and out[-1] != self.series[-1]:
            out.append(self.series[-1])
        return out

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {"coordinator.flwr-cli-calls": self.reaped_cpu_s}
        for role, seconds in self.cpu.values():
            out[role] = out.get(role, 0.0) + seconds
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()


# --- hospitals --------------------------------------------------------------------


class ProcessIsolatedSuperNode(SuperNodeSupervisor):
    """The hospital daemon's supervisor, with ClientApps run by an external SuperExec."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--isolation", "process"]


def _unique_port(taken: set[int]) -> int:
    """A free loopback port no earlier hospital got: ``free_port`` alone can hand out
    the same port twice before the first SuperNode binds it (seen at 100 nodes)."""
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


def _start_hospital(
    name: str, paths: dict[str, Path], work: Path, runtime_port: int
) -> tuple[SuperNodeSupervisor, dict[str, str]]:
    from fedvault.kit import Kit, KitKind

    kit_dir = paths["kits"] / "hospitals" / name
    kit = Kit.load(kit_dir, expected_kind=KitKind.HOSPITAL)
    state = (work / "hospital-state" / name).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = SuperNodeConfig(
        superlink=kit.coordinator_address,
        root_certificates=kit.ca_path,
        private_key=kit.node_key_path,
        state_dir=state / "supernode",
        runtime_port=runtime_port,
        node_config={
            "kit": str(kit_dir.resolve()),
            "data": str((paths["data"] / name / "data.toml").resolve()),
            "policy": str((paths["data"] / name / "policy.toml").resolve()),
            "state-dir": str(state),
        },
    )
    sup = ProcessIsolatedSuperNode(config)
    sup.start()
    node = {
        "name": name,
        "runtime": f"127.0.0.1:{config.runtime_port}",
        "flwr_home": str(config.state_dir / "flwr-home"),
    }
    return sup, node


def _write_nodes(path: Path, nodes: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(nodes))
    tmp.replace(path)


# --- the run ----------------------------------------------------------------------


def _read_store(store_url: str, job_name: str) -> dict[str, Any]:
    with RoundStore(store_url) as store:
        job = store.get_job(job_name)
        if job is None:
            return {"job": None, "rounds": [], "enrolled": [], "started_at": None}
        views = store.rounds(job.id)
        events = store.audit_events()
    started = [e.created_at for e in events if e.kind in ("job_started", "job_resumed")]
    enrolled = [str(e.detail.get("hospital")) for e in events if e.kind == "node_enrolled"]
    return {
        "job": job,
        "rounds": views,
        "enrolled": enrolled,
        "started_at": started[0] if started else None,
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_soak(
    out: Path,
    console: Console,
    *,
    hospitals: int,
    rounds: int,
    records: int = 32,
    max_children: int = 4,
    seed: int = 0,
    round_timeout: float = 900.0,
    start_interval: float = 1.0,
) -> dict[str, Any]:
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise FedvaultError(f"--out {out} is not empty; choose a new directory")
    work = out / "work"
    logs = out / "logs"
    logs.mkdir(parents=True)
    work.mkdir()
    t0 = time.monotonic()
    console.print(
        f"[bold]fedvault soak[/bold]: {hospitals} hospitals x {rounds} rounds on 127.0.0.1, "
        f"working in {out}"
    )
    paths = prepare(work, hospitals=hospitals, rounds=rounds, records=records, seed=seed)
    prepare_s = time.monotonic() - t0
    console.print(f"provisioned {hospitals} kits and data sets in {prepare_s:.1f} s")
    job_name = f"soak-{hospitals}h-{rounds}r"
    store_url = sqlite_url(paths["state"] / DEFAULT_STORE_FILENAME)
    nodes_file = work / "nodes.json"
    _write_nodes(nodes_file, [])
    env = flower_env(flwr_home=work / "flwr-home")
    env["OMP_NUM_THREADS"] = "1"  # CPU-bound tasks share 2 cores: no oversubscription
    procs: dict[str, Any] = {}
    supervisors: dict[str, SuperNodeSupervisor] = {}
    sampler = MemorySampler()
    timeline: dict[str, float] = {}
    status = "not started"
    try:
        procs["coordinator"] = spawn(
            [
                sys.executable, "-m", "fedvault", "coordinator", "start",
                "--kit", str(paths["kits"] / "coordinator"),
                "--job", str(paths["job"]),
                "--state", str(paths["state"]),
            ],
            env=env,
            log_path=logs / "coordinator.log",
        )  # fmt: skip
        sampler.coordinator_pid = procs["coordinator"].pid
        procs["executor"] = spawn(
            [
                sys.executable, "-m", "bench.soak_executor",
                "--nodes", str(nodes_file),
                "--max-children", str(max_children),
                "--stats", str(logs / "executor-stats.json"),
            ],
            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            log_path=logs / "executor.log",
        )  # fmt: skip
        sampler.hospital_pids.add(procs["executor"].pid)
        sampler.start()

        def checkpoint() -> None:
            """soak.json after every round: a long run that is cut short still reports."""
            partial = _result(
                store_url, job_name, hospitals, rounds, "running",
                time.monotonic() - t0, prepare_s, sampler, timeline,
            )  # fmt: skip
            (out / "soak.json").write_text(json.dumps(partial, indent=2, default=str))

        status = _drive(
            checkpoint=checkpoint,
            store_url=store_url,
            job_name=job_name,
            hospitals=hospitals,
            rounds=rounds,
            paths=paths,
            work=work,
            nodes_file=nodes_file,
            procs=procs,
            supervisors=supervisors,
            sampler=sampler,
            console=console,
            logs=logs,
            timeline=timeline,
            round_timeout=round_timeout,
            start_interval=start_interval,
            t0=t0,
        )
    except KeyboardInterrupt:
        status = "interrupted"
        console.print("[yellow]interrupted: stopping every process[/yellow]")
    except FedvaultError as exc:
        status = f"error: {exc}"
        console.print(f"[bold red]soak failed:[/bold red] {exc}")
    finally:
        with contextlib.suppress(Exception):
            sampler.sample()
        sampler.stop()
        _stop_all(procs, supervisors, console, logs)
    wall_s = time.monotonic() - t0
    result = _result(
        store_url, job_name, hospitals, rounds, status, wall_s, prepare_s, sampler, timeline
    )
    stats = logs / "executor-stats.json"
    result["executor"] = json.loads(stats.read_text()) if stats.exists() else None
    result["out_dir"] = str(out)
    (out / "soak.json").write_text(json.dumps(result, indent=2, default=str))
    with contextlib.suppress(Exception):  # a plot never costs the measured result
        result["plot"] = str(plot_soak(result, out / "soak.png"))
    return result


def _drive(
    *,
    checkpoint: Callable[[], None],
    store_url: str,
    job_name: str,
    hospitals: int,
    rounds: int,
    paths: dict[str, Path],
    work: Path,
    nodes_file: Path,
    procs: dict[str, Any],
    supervisors: dict[str, SuperNodeSupervisor],
    sampler: MemorySampler,
    console: Console,
    logs: Path,
    timeline: dict[str, float],
    round_timeout: float,
    start_interval: float,
    t0: float,
) -> str:
    """Start each hospital as soon as its key is enrolled, then follow the job."""
    nodes: list[dict[str, str]] = []
    ports: set[int] = set()
    progress = Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )
    agents = progress.add_task("hospitals", total=hospitals, status="enrolling node keys")
    rounds_task = progress.add_task("rounds", total=rounds, status="waiting for the job")
    # The coordinator enrols keys one `flwr` call at a time (4-10 s each here): wait
    # as long as enrolment progresses.
    enrol_deadline = time.monotonic() + 120 + ENROL_STALL_S
    last_change = time.monotonic()
    last_done = -1
    with progress:
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise FedvaultError(f"{name} exited early (code {proc.returncode}):\n{tail}")
            try:
                state = _read_store(store_url, job_name)
            except FedvaultError:
                state = {"job": None, "rounds": [], "enrolled": [], "started_at": None}
            new = [n for n in state["enrolled"] if n not in supervisors]
            for name in new:
                sup, node = _start_hospital(name, paths, work, _unique_port(ports))
                supervisors[name] = sup
                nodes.append(node)
                progress.update(agents, completed=len(supervisors))
                # Hospitals come online over a minute or so, not in one burst: 100
                # SuperNodes importing Flower at once put 40 runnable processes on
                # two cores, and activations timed out (then were refused as
                # "still online" on retry).
                time.sleep(start_interval)
            if new:
                _write_nodes(nodes_file, nodes)
                if len(supervisors) == hospitals:
                    timeline["all_supernodes_started_s"] = time.monotonic() - t0
            pids = {s.pid for s in supervisors.values()} - {None}
            sampler.hospital_pids = {procs["executor"].pid, *pids}  # type: ignore[misc]
            if (avail := _mem_available_mb()) < MIN_FREE_MB:
                raise FedvaultError(
                    f"only {avail:.0f} MB of memory left with {len(supervisors)} SuperNodes "
                    "up; stopping before the machine runs out (lower --hospitals)"
                )
            if new:
                enrol_deadline = time.monotonic() + ENROL_STALL_S
                last_change = time.monotonic()  # the round clock starts once all have joined
            if len(supervisors) < hospitals and time.monotonic() > enrol_deadline:
                raise FedvaultError(
                    f"only {len(supervisors)} of {hospitals} hospitals enrolled, none in the "
                    f"last {ENROL_STALL_S:.0f} s; see {logs / 'coordinator.log'}"
                )
            committed = [v for v in state["rounds"] if v.status == "committed"]
            failed = [v for v in state["rounds"] if v.status != "committed"]
            done = committed[-1].number if committed else 0
            coord = sampler.current("coordinator.total")
            hosp = sampler.current("hospitals.total")
            if done != last_done:
                if done and "first_round_s" not in timeline:
                    timeline["first_round_s"] = time.monotonic() - t0
                last_done, last_change = done, time.monotonic()
                if done:  # a line per round: readable in a log file, where bars are not drawn
                    progress.console.log(
                        f"round {done}/{rounds} committed ({committed[-1].num_participants} "
                        f"hospitals); failed attempts {len(failed)}; coordinator RSS "
                        f"{coord:.0f} MB, hospitals {hosp / 1024:.1f} GB; "
                        f"load {os.getloadavg()[0]:.1f}"
                    )
                    checkpoint()
            if new and not progress.console.is_terminal:
                progress.console.log(f"{len(supervisors)}/{hospitals} SuperNodes started")
            progress.update(
                agents,
                completed=len(supervisors),
                status=f"{len(pids)} SuperNodes up, {hosp / 1024:.1f} GB RSS",
            )
            progress.update(
                rounds_task,
                completed=done,
                status=f"failed attempts {len(failed)}   coordinator {coord:.0f} MB RSS",
            )
            job = state["job"]
            if job is not None and job.status in ("finished", "failed", "stopped"):
                return str(job.status)
            if time.monotonic() - last_change > round_timeout:
                raise FedvaultError(
                    f"no round committed for {round_timeout:.0f} s (last: {done}); "
                    f"see the logs in {logs}"
                )
            time.sleep(2.0)


def _stop_all(
    procs: dict[str, Any],
    supervisors: dict[str, SuperNodeSupervisor],
    console: Console,
    logs: Path,
) -> None:
    """Executor first (no new tasks), then every SuperNode in parallel, then the coordinator."""
    # A second Ctrl-C must not leave half the processes running.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if "executor" in procs:
            terminate_tree(procs["executor"], grace=10.0)
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(lambda s: s.stop(), supervisors.values()))
        if "coordinator" in procs:
            terminate_tree(procs["coordinator"], grace=20.0)
    finally:
        signal.signal(signal.SIGINT, previous)
    console.print(f"stopped the coordinator, {len(supervisors)} SuperNodes and the executor")


def _result(
    store_url: str,
    job_name: str,
    hospitals: int,
    rounds: int,
    status: str,
    wall_s: float,
    prepare_s: float,
    sampler: MemorySampler,
    timeline: dict[str, float],
) -> dict[str, Any]:
    try:
        state = _read_store(store_url, job_name)
    except FedvaultError:
        state = {"job": None, "rounds": [], "enrolled": [], "started_at": None}
    committed = [v for v in state["rounds"] if v.status == "committed"]
    failed = [v for v in state["rounds"] if v.status != "committed"]
    stamps = [v.committed_at for v in committed if v.committed_at is not None]
    if state["started_at"] is not None:
        stamps = [state["started_at"], *stamps]
    durations = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    steady = durations[1:] if len(durations) > 1 else durations  # round 1 has the key ceremony
    peak = {k: round(v, 1) for k, v in sorted(sampler.peak_mb.items())}
    job_status = state["job"].status if state["job"] is not None else None
    return {
        "hospitals": hospitals,
        "rounds_requested": rounds,
        "status": status,
        "job_status": job_status,
        "rounds_completed": len(committed),
        "failed_rounds": len(failed),
        "failed_reasons": [f"round {v.number} attempt {v.attempt}: {v.reason}" for v in failed],
        "store_committed_rounds": len(committed),
        "store_matches_rounds": len(committed) == rounds,
        "participants_per_round_min": min((v.num_participants for v in committed), default=0),
        "coordinator_peak_rss_mb": peak.get("coordinator.total"),
        "superlink_peak_rss_mb": peak.get("coordinator.superlink"),
        "serverapp_peak_rss_mb": peak.get("coordinator.serverapp"),
        "peak_rss_mb": peak,
        "rss_samples": sampler.samples,
        "cpu_s": sampler.cpu_by_role(),
        "wall_s": round(wall_s, 1),
        "prepare_s": round(prepare_s, 1),
        "timeline_s": {k: round(v, 1) for k, v in timeline.items()},
        "round1_s": round(durations[0], 2) if durations else None,
        "round_median_s": round(statistics.median(steady), 2) if steady else None,
        "round_p95_s": round(_percentile(steady, 0.95), 2) if steady else None,
        "round_max_s": round(max(steady), 2) if steady else None,
        "round_s": [round(d, 2) for d in durations],
        "rss_series": sampler.thinned_series() if sampler.series else [],
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def print_result(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Soak: {result['hospitals']} hospitals x {result['rounds_requested']}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f} MB"

    def s(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f} s"

    ok = result["store_matches_rounds"]
    rows = [
        ("status", f"{result['status']} (job {result['job_status']})"),
        ("rounds completed", str(result["rounds_completed"])),
        ("failed rounds (attempts)", str(result["failed_rounds"])),
        (
            "committed rounds in the store",
            f"{result['store_committed_rounds']} "
            + ("[green](= rounds)[/green]" if ok else "[red](!= rounds)[/red]"),
        ),
        ("fewest participants in a round", str(result["participants_per_round_min"])),
        ("coordinator peak RSS (whole tree)", mb(result["coordinator_peak_rss_mb"])),
        ("  SuperLink peak RSS", mb(result["superlink_peak_rss_mb"])),
        ("  ServerApp peak RSS", mb(result["serverapp_peak_rss_mb"])),
        ("hospital side peak RSS (all)", mb(result["peak_rss_mb"].get("hospitals.total"))),
        ("round 1 (incl. key ceremony)", s(result["round1_s"])),
        ("round median", s(result["round_median_s"])),
        ("round p95", s(result["round_p95_s"])),
        ("wall time", f"{result['wall_s']:.0f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    console.print(f"details: {Path(result['out_dir']) / 'soak.json'}")
    if result.get("plot"):
        console.print(f"plot: {result['plot']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--hospitals", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--records", type=int, default=32, help="training rows per hospital")
    parser.add_argument(
        "--max-children", type=int, default=4, help="ClientApp tasks run at once (all hospitals)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--round-timeout", type=float, default=900.0, help="give up after this long without a round"
    )
    parser.add_argument(
        "--start-interval", type=float, default=1.0, help="seconds between hospital starts"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedvault-soak-"))
    console = Console()

    def _sigterm(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, _sigterm)  # also when started in the background (SIG_IGN)
    try:
        result = run_soak(
            out,
            console,
            hospitals=args.hospitals,
            rounds=args.rounds,
            records=args.records,
            max_children=args.max_children,
            seed=args.seed,
            round_timeout=args.round_timeout,
            start_interval=args.start_interval,
        )
    except FedvaultError as exc:
        console.print(f"[bold red]soak failed:[/bold red] {exc}")
        return 2
    print_result(result, console)
    return 0 if result["status"] == "finished" and result["store_matches_rounds"] else 1


if __name__ == "__main__":
    sys.exit(main())
