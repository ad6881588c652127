"""Section ``big``: models of millions of parameters through ``fedvault simulate``.

Every job is ``fedvault.app.simulation.simulate`` (production ServerApp and
ClientApp, the SQLite store, reports) in its own child process
(:func:`bench.common.run_child`), so Ray starts and stops cleanly and each
process's peak memory is its own. Three measurements, side by side in one run:

1. **An 11.1M-parameter model.** An MLP ``64-3000-3000-640-10`` (tanh) on
   scikit-learn's digits (kind ``multiclass``; 11,125,050 parameters),
   3 simulated hospitals (479 training records each), 2 rounds, ε = 3:

   * ``dp_he``: DP-SGD and BFV-encrypted aggregation (the product);
   * ``dp``: the same job with ``secure_aggregation="none"`` (DP on, HE off);
   * ``plain``: DP *and* HE off. The product has no non-private training
     path, so in this job each Ray worker replaces the ClientApp's
     ``train_private`` by plain SGD (same data, loader, batch size, epochs,
     learning rate, no per-sample clipping, no noise); the patch is installed
     by the task's data loader, which runs in the worker. The accountant state
     is still extended by the steps taken, so the ledger and the coordinator
     accept the reply; the epsilon that job reports is nominal.

   Seconds per round: the time between the ends of rounds 1 and 2, taken in
   the ServerApp (round 1 also holds actor start-up and the DP plan); peak RSS
   per hospital: the largest ``VmHWM`` of any Ray worker process (each worker
   plays one hospital after another; ``/proc`` of the child's process tree,
   sampled every 0.5 s); the coordinator: ``VmHWM`` of the driver process
   (ServerApp, Flower's in-memory SuperLink state and the simulation engine)
   when the last round has been committed, before the runner exports the
   final model; bytes per hospital per round: ``report.json``'s
   ``rounds[].bytes_received`` over the round's participants.

2. **Coordinator memory, 3 vs 30 hospitals.** The same model, DP + HE,
   1 round, 45 training records per hospital in both jobs (the coordinator's
   memory is what matters; the ServerApp pulls replies a few at a time and
   folds each into the running encrypted sum).

3. **LoRA.** ``text-lora`` (LoRA adapters on a frozen MiniLM encoder, only
   the adapters and head shared) vs ``text-frozen-head`` (the frozen encoder
   and a linear head), 3 hospitals, ε = 8, 6 rounds (the example's defaults),
   DP + HE. Reported as "not available" if the task cannot be found.

``--quick`` shrinks everything (a 6.6k MLP, 1 round, 6 instead of 30
hospitals, LoRA on 2 hospitals with 30 notes each) so every code path runs in
a few minutes.

Run one job by hand::

    python -m bench.big_model --child '{"kind": "mlp", "mode": "dp_he", "hospitals": 3}'
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import Row, Section, run_child

__all__ = ["DigitsData", "LimitedData", "Mlp", "mlp_task", "run"]

FEATURES, CLASSES = 64, 10
HIDDEN = (3000, 3000, 640)  # 11,125,050 parameters
QUICK_HIDDEN = (64, 32)  # 6,570: --quick is a smoke test; process and Ray start-up set its time
ROUNDS = 2
EPSILON = 3.0
HOSPITALS = 3
COORD_HOSPITALS = 30
COORD_PER_HOSPITAL = 45  # training records per hospital in the coordinator jobs
LORA_HOSPITALS, LORA_ROUNDS, LORA_EPSILON = 3, 6, 8.0  # text_lora's documented defaults
LORA_TASKS = {  # entry-point name -> module:attribute if not (yet) registered
    "text-lora": "fedvault.examples.text_lora:TASK",
    "text-frozen-head": "fedvault.examples.text_lora:BASELINE_TASK",
}
BUDGET_S = 2700.0  # the whole full section; a child gets what is left, at most its cap
# The LoRA jobs: 3 x 3,200 notes through a 22.7M-parameter encoder for 6 rounds take
# ~25 min under a load of 8 on 2 cores (the 1,500 s cap cut the first run short).
LORA_CAP_S = 3000.0
LORA_BUDGET_S = 2 * LORA_CAP_S
QUICK_BUDGET_S = 400.0
SAMPLE_S = 0.5
RETRY_PAUSE_S = 30.0
MB = 1024 * 1024


# --- the model, the data and the non-private baseline (these run in Ray workers) ----------


@dataclass(frozen=True)
class Mlp:
    """``Linear(64, h1)-Tanh-...-Linear(hk, 10)``: a model factory (picklable)."""

    hidden: tuple[int, ...]

    def __call__(self) -> Any:
        from torch import nn

        layers: list[nn.Module] = []
        width = FEATURES
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, CLASSES))
        return nn.Sequential(*layers)

    @property
    def params(self) -> int:
        widths = (FEATURES, *self.hidden, CLASSES)
        return sum(a * b + b for a, b in itertools.pairwise(widths))


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn digits as 64 features in [0, 1], stratified 80/20 split (picklable).

    ``per_hospital``: keep only ``per_hospital * hospitals`` training records
    (and ``12 * hospitals`` test records), so every hospital holds about
    ``per_hospital``; 0 keeps the whole split (1,437 / 360). ``plain``: install
    non-private training in the process that loads the data (a Ray worker).
    """

    per_hospital: int = 0
    hospitals: int = 0
    plain: bool = False

    def __call__(self, seed: int) -> tuple[Any, Any]:
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from torch.utils.data import TensorDataset

        if self.plain:
            _install_plain_training()
        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=seed
        )
        if self.per_hospital:  # the split is shuffled: a prefix is a random subset
            x_train, y_train = (a[: self.per_hospital * self.hospitals] for a in (x_train, y_train))
            x_test, y_test = (a[: 12 * self.hospitals] for a in (x_test, y_test))

        def tensors(features: Any, labels: Any) -> TensorDataset:
            return TensorDataset(
                torch.as_tensor(features / 16.0, dtype=torch.float32),
                torch.as_tensor(labels, dtype=torch.int64),
            )

        return tensors(x_train, y_train), tensors(x_test, y_test)


@dataclass(frozen=True)
class LimitedData:
    """Another task's ``load_data`` cut to its first records (``--quick``; picklable)."""

    load: Any
    train: int
    test: int

    def __call__(self, seed: int) -> tuple[Any, Any]:
        from torch.utils.data import Subset

        train, test = self.load(seed)
        return (
            Subset(train, range(min(self.train, len(train)))),
            Subset(test, range(min(self.test, len(test)))),
        )


def mlp_task(hidden: tuple[int, ...], data: DigitsData) -> Any:
    from fedvault.task import Task, TrainingDefaults

    return Task(
        name="big-mlp",
        kind="multiclass",
        build_model=Mlp(tuple(hidden)),
        load_data=data,
        num_outputs=CLASSES,
        defaults=TrainingDefaults(
            batch_size=64, learning_rate=0.5, local_epochs=1, max_grad_norm=1.0
        ),
        description=f"MLP 64-{'-'.join(map(str, hidden))}-10 on scikit-learn digits",
    )


def _plain_train(
    model: Any,
    data: Any,
    *,
    task: Any,
    training: Any,
    batch_size: int,
    plan: Any,
    state: Any,
    device: Any,
    seed: int,
    **_ignored: Any,
) -> Any:
    """``train_private``'s stand-in for the baseline: plain SGD, no clipping, no noise."""
    import torch
    from torch.utils.data import DataLoader

    from fedvault.client.training import LocalResult

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=training.learning_rate,
        momentum=training.momentum,
    )
    criterion = task.criterion()
    total, seen, steps = 0.0, 0, 0
    for _ in range(training.local_epochs):
        for features, labels in loader:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(features), labels)
            loss.backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach()) * len(labels)
            seen += len(labels)
    model.to("cpu")
    # The ledger and the coordinator expect DP steps on the books: record the steps
    # taken with the plan's parameters (this baseline's epsilon is nominal).
    after = state.extended(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps
    )
    return LocalResult(loss=total / max(seen, 1), state=after, round_steps=steps)


def _install_plain_training() -> None:
    from fedvault.client import client_app

    client_app.train_private = _plain_train  # type: ignore[assignment]


# --- measuring a job (in the child process) ---------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """``/proc/PID/status`` memory fields in kB (``VmHWM``, ``RssAnon``, ...); {} if gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _status_kb(pid: int, key: str) -> int:
    return _status(pid).get(key, 0)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _is_worker(title: str) -> bool:
    """A Ray worker process (an actor that plays hospitals, or one not yet titled)."""
    if title.startswith("ray::"):
        return "Agent" not in title  # ray::DashboardAgent, ray::RuntimeEnvAgent
    return "default_worker.py" in title


@dataclass
class TreeSampler:
    """Peak RSS (``VmHWM``) of every process under this one, sampled from ``/proc``.

    Ray workers (``ray::ClientAppActor``, ``ray::IDLE``, or ``default_worker.py``
    before they set their title) are the simulated hospitals; the rest (GCS,
    raylet, dashboard and runtime-env agents) is Ray's own machinery. Also the
    largest *sampled* ``RssAnon`` (private memory, without the shared pages of
    Ray's object store that ``VmHWM`` counts) of every process and of this one.
    """

    interval: float = SAMPLE_S
    peaks_kb: dict[int, int] = field(default_factory=dict)
    anon_kb: dict[int, int] = field(default_factory=dict)
    titles: dict[int, str] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.sample()

    def sample(self) -> None:
        from fedvault.flower_env import descendants

        for pid in [os.getpid(), *descendants(os.getpid())]:
            status = _status(pid)
            hwm = status.get("VmHWM", 0)
            if not hwm:
                continue
            self.anon_kb[pid] = max(self.anon_kb.get(pid, 0), status.get("RssAnon", 0))
            if pid == os.getpid():
                continue
            # A Ray worker sets its title (``ray::...``) once it runs: read until it has.
            if not self.titles.get(pid, "").startswith("ray::"):
                self.titles[pid] = _cmdline(pid)[:100] or self.titles.get(pid, "")
            self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), hwm)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def workers_mb(self) -> dict[int, float]:
        return {
            pid: kb / 1024
            for pid, kb in self.peaks_kb.items()
            if _is_worker(self.titles.get(pid, ""))
        }

    def anon_mb(self, pids: Any) -> float | None:
        return max((self.anon_kb.get(pid, 0) / 1024 for pid in pids), default=None)

    def others_mb(self) -> dict[str, float]:
        return {
            f"{pid} {self.titles.get(pid, '')[:60]}": round(kb / 1024, 1)
            for pid, kb in self.peaks_kb.items()
            if not _is_worker(self.titles.get(pid, ""))
        }


def _resolve_lora(name: str) -> tuple[Any, str]:
    """The task and how it was found, or ``(None, why not)``."""
    from fedvault.errors import InvalidConfigError
    from fedvault.task_registry import installed_tasks, load_task

    if name in installed_tasks():
        return load_task(name).task, "entry point"
    try:
        return load_task(LORA_TASKS[name]).task, f"{LORA_TASKS[name]} (not registered)"
    except (InvalidConfigError, ImportError) as exc:
        return None, f"{name} is not registered and {LORA_TASKS[name]} does not load: {exc}"


def _job_task(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    if spec["kind"] == "mlp":
        data = DigitsData(
            per_hospital=int(spec.get("per_hospital", 0)),
            hospitals=int(spec["hospitals"]),
            plain=spec["mode"] == "plain",
        )
        task = mlp_task(tuple(spec["hidden"]), data)
        return task, {"params": Mlp(tuple(spec["hidden"])).params}
    task, found = _resolve_lora(spec["task"])
    if task is None:
        return None, {"available": False, "reason": found}
    if spec.get("limit"):
        per = int(spec["limit"])
        hospitals = int(spec["hospitals"])
        task = replace(task, load_data=LimitedData(task.load_data, per * hospitals, 20 * hospitals))
    return task, {"available": True, "found": found}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    from fedvault.app import simulation
    from fedvault.config import JobConfig

    task, info = _job_task(spec)
    if task is None:
        return info
    mode = spec.get("mode", "dp_he")
    config = JobConfig.for_task(
        task,
        hospitals=int(spec["hospitals"]),
        rounds=int(spec["rounds"]),
        epsilon=float(spec["epsilon"]),
        secure_aggregation="he" if mode == "dp_he" else "none",
        seed=0,
    )

    times: dict[str, Any] = {"ends": [], "seen": set(), "failures": [], "refusals": []}
    driver: dict[str, float] = {}

    class TimedObserver(simulation.RichObserver):
        def on_start(self, job: Any, resumed_after: int) -> None:
            times["start"] = time.perf_counter()
            driver["at_start_mb"] = _status_kb(os.getpid(), "VmHWM") / 1024
            super().on_start(job, resumed_after)

        def on_round(self, view: Any) -> None:
            # The last round is shown twice (committed, then as the job's end): once here.
            if view.number not in times["seen"]:
                times["seen"].add(view.number)
                times["ends"].append(time.perf_counter())
            for part in view.participations:
                if part.status != "ok":
                    times["refusals"].append(f"round {view.number}: {part.hospital} {part.reason}")
            super().on_round(view)

        def on_round_failed(self, number: int, attempt: int, reason: str) -> None:
            times["failures"].append(f"round {number} attempt {attempt}: {reason}"[:2000])
            super().on_round_failed(number, attempt, reason)

    export = simulation._export_final_model

    def snapshot_then_export(*args: Any, **kwargs: Any) -> None:
        # The coordinator's part is over; the export decrypts the model in the runner.
        driver["peak_mb"] = _status_kb(os.getpid(), "VmHWM") / 1024
        with contextlib.suppress(Exception):
            sampler.sample()
        driver["peak_anon_mb"] = sampler.anon_mb([os.getpid()]) or 0.0
        export(*args, **kwargs)

    simulation.RichObserver = TimedObserver  # type: ignore[misc]
    simulation._export_final_model = snapshot_then_export  # type: ignore[assignment]
    sampler = TreeSampler()
    sampler.start()
    start = time.perf_counter()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="fedvault-big-") as tmp,
            open(os.devnull, "w") as sink,
        ):
            report = simulation.simulate(
                config, task=task, out_dir=Path(tmp), console=Console(file=sink)
            )
    finally:
        sampler.stop()
    wall = time.perf_counter() - start
    driver.setdefault("peak_mb", _status_kb(os.getpid(), "VmHWM") / 1024)

    marks = [times.get("start", start), *times["ends"]]
    round_s = [b - a for a, b in itertools.pairwise(marks)]
    per_hospital = [
        r["bytes_received"] / len(r["participants"])
        for r in report.get("rounds", [])
        if r.get("participants")
    ]
    workers = sampler.workers_mb()
    model = task.build_model()
    shared = set(task.shared_names(model))
    out = {
        **info,
        "mode": mode,
        "task": task.name,
        "hospitals": config.hospitals,
        "rounds_asked": config.rounds,
        "status": report.get("final", {}).get("status"),
        "rounds": len(report.get("rounds", [])),
        "accuracy": report.get("final", {}).get("accuracy"),
        "epsilon_max": report.get("final", {}).get("epsilon_max"),
        "round_s": round_s,
        # Round 1 also holds actor start-up and the DP plan: later rounds when there are any.
        "round_s_steady": statistics.median(round_s[1:] or round_s) if round_s else None,
        "bytes_per_hospital_round": statistics.mean(per_hospital) if per_hospital else None,
        "driver_peak_mb": driver["peak_mb"],
        "driver_at_start_mb": driver.get("at_start_mb"),
        "driver_peak_anon_mb": driver.get("peak_anon_mb", sampler.anon_mb([os.getpid()])),
        "worker_peak_mb": max(workers.values(), default=None),
        "worker_peak_anon_mb": sampler.anon_mb(workers),
        "workers_peak_mb": sorted(round(v, 1) for v in workers.values()),
        "ray_processes_peak_mb": sampler.others_mb(),
        "samples": sampler.samples,
        "params": info.get("params", sum(p.numel() for p in model.parameters())),
        "shared_params": sum(v.numel() for k, v in model.state_dict().items() if k in shared),
        "wall_s": wall,
        "round_failures": times["failures"],
        "refusals": times["refusals"][:20],
    }
    return out


# --- the section (parent process) -------------------------------------------------------


def _jobs(quick: bool) -> list[tuple[str, dict[str, Any], float]]:
    """(name, child spec, time cap in seconds), in running order."""
    hidden = list(QUICK_HIDDEN if quick else HIDDEN)
    rounds = 1 if quick else ROUNDS
    many = 6 if quick else COORD_HOSPITALS
    # --quick: part 1 runs on the coordinator jobs' small data, and its DP+HE job is
    # also the 3-hospital coordinator job.
    per = COORD_PER_HOSPITAL if quick else 0
    mlp = {"kind": "mlp", "hidden": hidden, "epsilon": EPSILON}
    jobs: list[tuple[str, dict[str, Any], float]] = [
        (
            f"mlp_{mode}",
            {**mlp, "mode": mode, "hospitals": HOSPITALS, "rounds": rounds, "per_hospital": per},
            300 if quick else 900,
        )
        for mode in ("dp_he", "dp", "plain")
    ]
    coordinator = {**mlp, "mode": "dp_he", "rounds": 1, "per_hospital": COORD_PER_HOSPITAL}
    if not quick:
        jobs.append(("coord_3", {**coordinator, "hospitals": HOSPITALS}, 600))
    jobs.append((f"coord_{many}", {**coordinator, "hospitals": many}, 300 if quick else 1500))
    return jobs


def _lora_jobs(quick: bool) -> list[tuple[str, dict[str, Any], float]]:
    """The LoRA job and its frozen-encoder baseline: (name, child spec, time cap in seconds)."""
    jobs: list[tuple[str, dict[str, Any], float]] = []
    lora = {
        "kind": "lora",
        "mode": "dp_he",
        "hospitals": 2 if quick else LORA_HOSPITALS,
        "rounds": 1 if quick else LORA_ROUNDS,
        "epsilon": LORA_EPSILON,
        "limit": 30 if quick else 0,
    }
    for name in LORA_TASKS:
        jobs.append((name, {**lora, "task": name}, 300 if quick else LORA_CAP_S))
    return jobs


def _attempt(spec: dict[str, Any], cap_s: float) -> dict[str, Any]:
    if cap_s < 30:
        return {"ok": False, "reason": "not run: the section's time budget is spent"}
    run = run_child("bench.big_model", ["--child", json.dumps(spec)], cap_s)
    if run.returncode is None:
        return {"ok": False, "reason": f"time cap ({cap_s:.0f} s)", "wall_s": run.wall_s}
    if run.returncode != 0:
        return {"ok": False, "reason": run.stderr[-3000:], "wall_s": run.wall_s}
    try:
        result = run.last_json()
    except (ValueError, IndexError):
        return {"ok": False, "reason": "no result: " + run.stderr[-2000:], "wall_s": run.wall_s}
    if result.get("available") is False:
        return {**result, "ok": False}
    ok = result["status"] == "finished" and result["rounds"] == result["rounds_asked"]
    out = {**result, "ok": ok, "child_wall_s": run.wall_s}
    if not ok:
        out["reason"] = "; ".join(result.get("round_failures", [])[-3:]) + run.stderr[-3000:]
    return out


def _retry(result: dict[str, Any]) -> bool:
    """Whether a failed job is worth one more try: not a time cap, not a missing task.

    The machine is shared: Ray's memory monitor kills workers when *others* use
    the memory, and a task file edited during a job changes its fingerprint.
    """
    reason = str(result.get("reason", ""))
    return not result["ok"] and result.get("available") is not False and "time cap" not in reason


def _run_job(spec: dict[str, Any], cap_s: float, deadline: float) -> dict[str, Any]:
    """One job; once more, after a pause, if it failed (see :func:`_retry`)."""
    result = _attempt(spec, min(cap_s, deadline - time.monotonic()))
    if _retry(result) and deadline - time.monotonic() > RETRY_PAUSE_S + 60:
        time.sleep(RETRY_PAUSE_S)
        first = result
        result = _attempt(spec, min(cap_s, deadline - time.monotonic()))
        result["first_attempt"] = {k: v for k, v in first.items() if k != "reason"}
        result["first_attempt"]["reason"] = str(first.get("reason", ""))[-1000:]
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _mb(value: float | None) -> float | None:
    return None if value is None else value / MB


def run(quick: bool = False) -> Section:
    """Section ``big``: the 11M-parameter jobs and the coordinator's memory at scale."""
    deadline = time.monotonic() + (QUICK_BUDGET_S if quick else BUDGET_S)
    jobs = {name: _run_job(spec, cap, deadline) for name, spec, cap in _jobs(quick)}
    section = Section(name="big", details={"jobs": jobs, "quick": quick})
    section.rows, section.keys = _mlp_rows(jobs, quick)
    rows, keys = _coordinator_rows(jobs, quick)
    section.rows += rows
    section.keys.update(keys)
    return section


def run_lora(quick: bool = False) -> Section:
    """Section ``lora``: LoRA fine-tuning against a frozen encoder's head, same ε."""
    deadline = time.monotonic() + (QUICK_BUDGET_S if quick else LORA_BUDGET_S)
    jobs = {name: _run_job(spec, cap, deadline) for name, spec, cap in _lora_jobs(quick)}
    section = Section(name="lora", details={"jobs": jobs, "quick": quick})
    section.rows, section.keys = _lora_rows(jobs, quick)
    return section


def _judge(quick: bool, ratio: float | None, target: Any) -> bool | None:
    """Pass/fail of a ratio; not judged in ``--quick`` (sizes too small to mean anything)."""
    return None if quick or ratio is None else bool(target(ratio))


def _get(job: dict[str, Any], key: str) -> Any:
    return job.get(key) if job.get("ok") else None


def _mlp_rows(jobs: dict[str, dict[str, Any]], quick: bool) -> tuple[list[Row], dict[str, Any]]:
    dp_he, dp, plain = jobs["mlp_dp_he"], jobs["mlp_dp"], jobs["mlp_plain"]
    params = dp_he.get("params") or Mlp(QUICK_HIDDEN if quick else HIDDEN).params
    round_he, round_dp, round_plain = (_get(j, "round_s_steady") for j in (dp_he, dp, plain))
    mem_he, mem_dp, mem_plain = (_get(j, "worker_peak_mb") for j in (dp_he, dp, plain))
    bytes_he = _get(dp_he, "bytes_per_hospital_round")
    bytes_plain = _get(plain, "bytes_per_hospital_round")
    round_ratio, mem_ratio = _ratio(round_he, round_plain), _ratio(mem_dp, mem_plain)
    which = "round 2" if not quick else "round 1 (with start-up)"
    label = f"big: {params:,}-param MLP, {HOSPITALS} hospitals"
    rows = [
        Row(
            f"{label}, DP+HE job completes ({dp_he.get('rounds', 0)} rounds)",
            1.0 if dp_he.get("ok") else 0.0,
            None,
            "",
            "finished",
            bool(dp_he.get("ok")),
            note=str(dp_he.get("reason", ""))[-200:],
        ),
        Row(
            f"big: seconds per round ({which}), DP+HE vs DP and HE off",
            round_he,
            round_plain,
            "s",
            "<= 3x",
            _judge(quick, round_ratio, lambda r: r <= 3),
            note="baseline: plain SGD patched into the workers (no non-private path exists)",
        ),
        Row("  DP only (HE off) vs DP and HE off", round_dp, round_plain, "s"),
        Row(
            "big: hospital peak RSS (largest Ray worker), DP vs no DP, HE off",
            mem_dp,
            mem_plain,
            "MB",
            "<= 2x",
            _judge(quick, mem_ratio, lambda r: r <= 2),
        ),
        Row("  hospital peak RSS, DP+HE vs DP and HE off", mem_he, mem_plain, "MB"),
        Row(
            "big: coordinator (driver) peak RSS, DP+HE vs DP and HE off",
            _get(dp_he, "driver_peak_mb"),
            _get(plain, "driver_peak_mb"),
            "MB",
        ),
        Row(
            "big: MB per hospital per round, HE vs plaintext",
            _mb(bytes_he),
            _mb(bytes_plain),
            "MB",
        ),
    ]
    keys = {
        "big_params": params,
        "big_round_s_dp_he": round_he,
        "big_round_s_dp": round_dp,
        "big_round_s_plain": round_plain,
        "big_round_ratio": round_ratio,
        "big_hospital_peak_mb_dp": mem_dp,
        "big_hospital_peak_mb_dp_he": mem_he,
        "big_hospital_peak_mb_nodp": mem_plain,
        "big_hospital_mem_ratio": mem_ratio,
        "big_coordinator_peak_mb_dp_he": _get(dp_he, "driver_peak_mb"),
        "big_bytes_per_hospital_round": bytes_he,
        "big_bytes_per_hospital_round_plain": bytes_plain,
        "big_accuracy_dp_he": _get(dp_he, "accuracy"),
        "big_accuracy_plain": _get(plain, "accuracy"),
    }
    return rows, keys


def _coordinator_rows(
    jobs: dict[str, dict[str, Any]], quick: bool
) -> tuple[list[Row], dict[str, Any]]:
    many = 6 if quick else COORD_HOSPITALS
    few = jobs["mlp_dp_he"] if quick else jobs["coord_3"]
    big = jobs[f"coord_{many}"]
    mb_few, mb_many = _get(few, "driver_peak_mb"), _get(big, "driver_peak_mb")
    ratio = _ratio(mb_many, mb_few)
    row = Row(
        f"big: coordinator peak RSS, {many} vs {HOSPITALS} hospitals (1 round, DP+HE)",
        mb_many,
        mb_few,
        "MB",
        "<= 1.2x",
        _judge(quick, ratio, lambda r: r <= 1.2),
        note=str(big.get("reason", ""))[-200:],
    )
    keys = {
        f"big_coordinator_peak_mb_{HOSPITALS}": mb_few,
        f"big_coordinator_peak_mb_{many}": mb_many,
        "big_coordinator_ratio": ratio,
        f"big_round_s_{many}_hospitals": _get(big, "round_s_steady"),
    }
    return [row], keys


def _lora_rows(jobs: dict[str, dict[str, Any]], quick: bool) -> tuple[list[Row], dict[str, Any]]:
    lora, frozen = jobs["text-lora"], jobs["text-frozen-head"]
    if lora.get("available") is False or frozen.get("available") is False:
        why = lora.get("reason") or frozen.get("reason") or ""
        return [Row("lora: text-lora not available", None, note=str(why)[:200])], {}
    acc, base = _get(lora, "accuracy"), _get(frozen, "accuracy")
    rows = [
        Row(
            f"lora: final accuracy, text-lora vs text-frozen-head ({lora.get('rounds', 0)} "
            f"rounds, eps {LORA_EPSILON:g})",
            acc,
            base,
            "",
            "LoRA > frozen",
            _judge(quick, _ratio(acc, base), lambda r: r > 1),
            higher_is_better=True,
            note=str(lora.get("reason") or frozen.get("reason") or "")[-200:],
        ),
        Row(
            "lora: shared (adapter + head) parameters",
            _get(lora, "shared_params"),
            _get(frozen, "shared_params"),
        ),
        Row(
            "lora: KB per hospital per round",
            None
            if _get(lora, "bytes_per_hospital_round") is None
            else lora["bytes_per_hospital_round"] / 1024,
            None
            if _get(frozen, "bytes_per_hospital_round") is None
            else frozen["bytes_per_hospital_round"] / 1024,
            "KB",
        ),
        Row(
            "lora: seconds per round",
            _get(lora, "round_s_steady"),
            _get(frozen, "round_s_steady"),
            "s",
        ),
    ]
    keys = {
        "lora_params": _get(lora, "params"),
        "lora_shared_params": _get(lora, "shared_params"),
        "lora_baseline_shared_params": _get(frozen, "shared_params"),
        "lora_bytes_per_round": _get(lora, "bytes_per_hospital_round"),
        "lora_baseline_bytes_per_round": _get(frozen, "bytes_per_hospital_round"),
        "lora_round_s": _get(lora, "round_s_steady"),
        "lora_baseline_round_s": _get(frozen, "round_s_steady"),
        "lora_accuracy": acc,
        "lora_baseline_accuracy": base,
    }
    return rows, keys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.big_model")
    parser.add_argument("--child", help="run one job (a JSON spec) and print its result")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child)), default=str))
    else:
        section = run(args.quick)
        print(json.dumps({"keys": section.keys, "details": section.details}, indent=2))


if __name__ == "__main__":
    # Run the *imported* module's main: Ray pickles ``__main__``'s classes by value,
    # and the workers must import this module's (the task's code is fingerprinted).
    from bench.big_model import main as _main

    _main(sys.argv[1:])
