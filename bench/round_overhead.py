"""Measurement 4: coordinator round overhead against a plain Flower FedAvg round.

Both run on Flower's simulation runtime as ``fedvault simulate`` runs it (one
Ray actor per core, the LinkState indexed by destination node:
``fedvault/app/sim_linkstate.py``), the same number of simulated
hospitals, the same model (the digits CNN, 6,186 weights) and clients that do
no training:

* **ours**: the production ServerApp (``coordinator/server_app.py``: reply
  validation, encrypted aggregation, the SQLite round-store commit, audit
  rows) with a client that answers every round with a valid reply and its
  piggybacked evaluation: in ``none`` mode the arrays it received, undecoded (as
  Flower's no-op client does), in ``he`` mode an encrypted update (encrypted once
  per round and worker, then reused);
* **Flower**: ``flwr.serverapp.strategy.FedAvg`` with a client that returns
  the arrays it received. Its default round also runs a separate evaluation
  exchange; ours carries evaluation inside the train reply, so the key ratio
  compares against FedAvg *without* the evaluation exchange (one exchange per
  round on both sides), and the default round is reported beside it.

A round's time is the time between the ends of consecutive rounds, measured in
the ServerApp; round 1 (actor start-up, the initial model) is dropped and the
median of the rest is kept. Ours and FedAvg run alternately in one process
on one Ray session, :data:`PAIRED_REPEATS` times each (``--quick``: once), and
each side's rounds are pooled: run one after the other in separate processes,
the two sides saw different machines (three quiet runs gave 1.00x, 1.16x and
1.28x). The other configurations run in their own process.
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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import Row, Section, run_child

__all__ = ["run"]

ROUNDS = 9  # round 1 is dropped: the median of 8 (it moves by tens of ms between rounds)
SIZES = (10, 100)
# --quick (the bench smoke): both sides once, in one process on one Ray session;
# 3 rounds: round 1 is dropped, so two are measured.
QUICK_ROUNDS = 3
QUICK_HOSPITALS = 5
# Ours and FedAvg alternately, this many times each, on one Ray session.
PAIRED_REPEATS = 3
# The ServerApp's own work (``--inline``): no runtime, so a round costs milliseconds.
INLINE_ROUNDS = 12
PULL_S = 0.01  # lever: the in-memory grid's reply polling interval (Flower default 0.1 s)
TIMEOUT_S = 300  # a child past this is reported as failed (Ray can hang under load)
# Per worker process: keys and the round's encrypted update, made once.
_CLIENT_CACHE: dict[Any, Any] = {}


class _Clock:
    """Cumulative wall time per phase, snapshotted at every round end (measurement only)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.ends: list[float] = []
        self.snapshots: list[dict[str, float]] = []

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        """Replace ``owner.name`` by a version that adds its wall time to ``phase``."""
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        setattr(owner, name, timed)

    def add(self, phase: str, seconds: float) -> None:
        self.total[phase] = self.total.get(phase, 0.0) + seconds

    def round_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.snapshots.append(dict(self.total))

    def per_round(self, phase: str, first: int, last: int) -> list[float]:
        """Seconds spent in ``phase`` in each of rounds ``first+1 .. last``."""
        return [
            self.snapshots[i].get(phase, 0.0) - self.snapshots[i - 1].get(phase, 0.0)
            for i in range(first, min(last, len(self.snapshots)))
        ]

    def phases(self, first: int, last: int) -> dict[str, float]:
        """Median seconds per round spent in each phase, rounds ``first+1 .. last``."""
        out: dict[str, float] = {}
        names = set().union(*self.snapshots) if self.snapshots else set()
        for phase in sorted(names):
            if per_round := self.per_round(phase, first, last):
                out[phase] = statistics.median(per_round)
        return out


def _backend_config() -> dict[str, Any]:
    """What ``fedvault.app.simulation.simulate`` passes to Flower (one actor per core)."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "ERROR",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


def _simulate(server: Any, client: Any, hospitals: int) -> None:
    """Run a ServerApp and ClientApp on Flower's runtime as ``fedvault simulate`` runs it."""
    from flwr.simulation import run_simulation

    from fedvault.app.sim_linkstate import indexed_linkstate

    _quiet()
    with indexed_linkstate():  # the LinkState index, for both sides
        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=hospitals,
            backend_config=_backend_config(),  # type: ignore[arg-type]
        )


class _InlineGrid:
    """A grid whose hospitals answer in this thread when their reply is pulled (``--inline``).

    No Flower runtime, no Ray, no polling: a round's time is then the ServerApp's
    own work plus the clients' (timed apart, as phase ``simulated_clients``). It
    is the part of a round that is the coordinator's alone, and it holds still
    under load where the simulated round moves by tens of milliseconds.
    """

    def __init__(self, hospitals: int, handlers: dict[str, Any], clock: _Clock) -> None:
        from flwr.app import Context, RecordDict

        self.handlers, self.clock = handlers, clock
        self.pending: dict[str, Any] = {}
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, hospitals + 1)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        import uuid

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Any]:
        replies = []
        for msg_id in message_ids:
            msg = self.pending.pop(msg_id, None)
            if msg is not None:
                start = time.perf_counter()
                handler = self.handlers[msg.metadata.message_type.split(".")[0]]
                replies.append(handler(msg, self.contexts[msg.metadata.dst_node_id]))
                self.clock.add("simulated_clients", time.perf_counter() - start)
        return replies

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        return self.pull_messages(self.push_messages(messages))


def _run(
    server: Any,
    client: Any,
    main: Any,
    handlers: dict[str, Any],
    hospitals: int,
    clock: _Clock,
    inline: bool,
) -> None:
    """On Flower's simulation runtime, or ``inline`` (:class:`_InlineGrid`)."""
    if not inline:
        _simulate(server, client, hospitals)
        return
    from flwr.supercore.task_identity import TaskIdentity

    _quiet()
    # What Flower sets in a ServerApp process before messages can be made.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    main(_InlineGrid(hospitals, handlers, clock), None)


def _quiet() -> None:
    import logging
    import warnings

    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _weights() -> dict[str, Any]:
    import torch

    from fedvault.examples.digits import build_model

    torch.manual_seed(0)
    return {k: v.numpy().copy() for k, v in build_model().state_dict().items()}


def run_flower(
    hospitals: int,
    rounds: int,
    evaluate: bool,
    pull_s: float | None = None,
    inline: bool = False,
) -> _Clock:
    """Round end times of a plain Flower FedAvg job with no-op clients."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    clock = _Clock()

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            out = super().aggregate_train(server_round, replies)
            if not evaluate:
                clock.round_end()
            return out

        def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
            out = super().aggregate_evaluate(server_round, replies)
            if evaluate:
                clock.round_end()
            return out

    client = ClientApp()

    @client.train()  # type: ignore[misc]
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @client.evaluate()  # type: ignore[misc]
    def evaluate_fn(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 10, "accuracy": 0.5, "loss": 1.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    server = ServerApp()

    @server.main()  # type: ignore[misc]
    def main(grid: Grid, context: Context) -> None:
        _set_pull_interval(grid, pull_s)
        clock.wrap(grid, "send_and_receive", "wait_for_replies")
        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0 if evaluate else 0.0,
            min_train_nodes=hospitals,
            min_evaluate_nodes=hospitals if evaluate else 0,
            min_available_nodes=hospitals,
        )
        import torch

        from fedvault.examples.digits import build_model

        torch.manual_seed(0)
        initial = ArrayRecord(build_model().state_dict())
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)

    handlers = {"train": train, "evaluate": evaluate_fn}
    _run(server, client, main, handlers, hospitals, clock, inline)
    return clock


def run_ours(
    hospitals: int,
    rounds: int,
    workdir: Path,
    pull_s: float | None = None,
    he: bool = False,
    profile: Path | None = None,
    inline: bool = False,
) -> _Clock:
    """Round end times of fedvault's ServerApp with no-op clients (``none`` or ``he`` mode)."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from fedvault.config import JobConfig
    from fedvault.coordinator import server_app
    from fedvault.coordinator.records import RoundView
    from fedvault.coordinator.report import ReportBuilder
    from fedvault.coordinator.server_app import CoordinatorSettings, run_job
    from fedvault.coordinator.store import RoundStore, sqlite_url
    from fedvault.coordinator.strategy import RoundCollector, SecureFedAvg
    from fedvault.examples.digits import EXAMPLE
    from fedvault.messages import (
        CONFIG_KEY,
        MODEL_KEY,
        EvalReply,
        ModelPayload,
        ReplyStatus,
        RoundInstruction,
        TrainReply,
    )
    from fedvault.privacy.dp import AccountantState
    from fedvault.privacy.he_context import HeContext
    from fedvault.task_registry import load_task

    job = JobConfig.for_example(
        EXAMPLE,
        hospitals=hospitals,
        rounds=rounds,
        secure_aggregation="he" if he else "none",
        # This client cannot mask (no shares, no unmask answers); masked rounds have
        # their own section (secagg). Without this the he run failed in round 1.
        masking=False,
        job="bench-rounds",
    )
    public = None
    key_path = ""
    if he:
        secret = HeContext.generate()
        # Workers read the key from a file: the ClientApp travels to them by value
        # with every message, so it must not carry the secret key itself.
        key_file = workdir / "he-secret.ctx"
        key_file.write_bytes(secret.serialize_secret())
        key_path = str(key_file)
        public = secret.public()
    settings = CoordinatorSettings(
        job=job,
        store_url=sqlite_url(workdir / "store.sqlite"),
        task=load_task("digits"),
        public_context=public,
        report_dir=None,
    )
    # Where a round's time goes, on the ServerApp's thread.
    clock = _Clock()
    # Replies are validated and added as they arrive, inside the wait (streaming).
    clock.wrap(server_app._RoundRunner, "_exchange", "wait_validate_and_aggregate")
    clock.wrap(SecureFedAvg, "configure_train", "configure")
    clock.wrap(RoundCollector, "finish", "finish_aggregate")
    clock.wrap(RoundStore, "commit_round", "store_commit")
    clock.wrap(server_app, "_committed_round", "store_read_view")
    clock.wrap(ReportBuilder, "build", "report_build")  # the summary relayed to hospitals

    class Timer:
        def on_start(self, job: JobConfig, resumed_after: int) -> None:
            pass

        def on_round(self, view: RoundView) -> None:
            if len(clock.ends) < rounds:  # the final evaluation reports round R again
                clock.round_end()

        def on_round_failed(self, number: int, attempt: int, reason: str) -> None:
            raise RuntimeError(f"round {number} failed: {reason}")

    client = ClientApp()

    @client.train()  # type: ignore[misc]
    def train(msg: Message, context: Context) -> Message:
        payload = None
        if key_path:
            instr = RoundInstruction.from_message(msg)
            server_round = instr.server_round
            payload = ModelPayload(
                envelope=_cached_update(key_path, instr.job.job, server_round, instr.key_epoch)
            )
        else:
            server_round = int(msg.content.config_records[CONFIG_KEY]["server-round"])  # type: ignore[arg-type]
        steps = 10 * server_round
        reply = TrainReply(
            hospital=f"hospital-{int(context.node_config['partition-id']) + 1}",
            status=ReplyStatus.OK,
            update=payload,
            samples=10,
            train_loss=0.5,
            epsilon=0.1 * server_round,
            delta=1e-5,
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=steps,
            round_steps=10,
            accountant="prv",
            accountant_state=AccountantState("prv", ((1.0, 0.1, steps),)).to_json(),
            eval_accuracy=0.5,
            eval_loss=1.0,
            eval_samples=10,
        )
        content = reply.to_content()
        if payload is None:
            # Like Flower's no-op client: the arrays received go back as they came. Decoding
            # and re-encoding them cost this client ~2.8 ms a message, 0.14 s of a
            # 100-hospital round on 2 workers, none of it the coordinator's.
            content[MODEL_KEY] = msg.content.array_records[MODEL_KEY]
        return Message(content, reply_to=msg)

    @client.query()  # type: ignore[misc]
    def query(msg: Message, context: Context) -> Message:  # the job's summary, at its end
        return Message(msg.content, reply_to=msg)

    @client.evaluate()  # type: ignore[misc]
    def evaluate_fn(msg: Message, context: Context) -> Message:
        name = f"hospital-{int(context.node_config['partition-id']) + 1}"
        reply = EvalReply(hospital=name, status=ReplyStatus.OK, accuracy=0.5, loss=1.0, samples=10)
        return Message(reply.to_content(), reply_to=msg)

    server = ServerApp()

    @server.main()  # type: ignore[misc]
    def main(grid: Grid, context: Context) -> None:  # make_server_app, plus the poll setting
        _set_pull_interval(grid, pull_s)
        if profile is not None:  # the ServerApp's thread only: where the coordinator's time goes
            import cProfile

            with cProfile.Profile() as prof:
                status = run_job(grid, settings, Timer())
            prof.dump_stats(profile)
        else:
            status = run_job(grid, settings, Timer())
        if status != "finished":
            raise RuntimeError(f"job ended {status}")

    handlers = {"train": train, "query": query, "evaluate": evaluate_fn}
    _run(server, client, main, handlers, hospitals, clock, inline)
    return clock


def _cached_update(key_path: str, job: str, server_round: int, key_epoch: int) -> bytes:
    """The round's encrypted update, made once per worker process.

    Module level on purpose: Flower ships the ClientApp to its workers by
    value for every message, so state kept in a closure would not survive.
    """
    from fedvault.privacy.he import encrypt_update
    from fedvault.privacy.he_context import HeContext

    cache = _CLIENT_CACHE
    if cache.get("key_path") != key_path:
        cache.clear()
        cache["key_path"] = key_path
        cache["ctx"] = HeContext.from_bytes(Path(key_path).read_bytes())
    key = (job, server_round, key_epoch)
    if key not in cache:
        cache[key] = encrypt_update(
            cache["ctx"],
            _weights(),
            weight=10.0,
            key_epoch=key_epoch,
            job=job,
            server_round=server_round,
        )
    update: bytes = cache[key]
    return update


def _set_pull_interval(grid: Any, seconds: float | None) -> None:
    """Flower's in-memory grid polls for replies every 0.1 s; ``None`` keeps that."""
    if seconds is not None and hasattr(grid, "pull_interval"):
        grid.pull_interval = seconds


def _durations(ends: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(ends)]


def _child(
    mode: str, hospitals: int, rounds: int, pull_s: float | None = None, inline: bool = False
) -> dict[str, Any]:
    """Run one configuration in a fresh process (Ray starts and stops cleanly).

    A failure or a hang (seen under heavy load: Ray's raylet died and the
    simulation waited forever) is returned as ``{"error": ...}``, so one
    configuration does not lose the others' results.
    """
    args = ["--mode", mode, "--hospitals", str(hospitals), "--rounds", str(rounds)]
    args += ["--pull-interval", str(pull_s)] if pull_s is not None else []
    args += ["--inline"] if inline else []
    run = run_child("bench.round_overhead", args, TIMEOUT_S)
    if run.returncode is None:
        return {"mode": mode, "error": f"no result within {TIMEOUT_S} s"}
    if run.returncode != 0:
        return {"mode": mode, "error": run.stderr[-2000:]}
    out = run.last_json()
    out["wall_s"] = run.wall_s
    return out


def _ratio(ours: dict[str, Any], base: dict[str, Any]) -> float | None:
    if "error" in ours or "error" in base:
        return None
    return float(ours["median_round_s"] / base["median_round_s"])


def _row(label: str, ours: dict[str, Any], base: dict[str, Any], target: bool) -> Row:
    ratio = _ratio(ours, base)
    return Row(
        label + ("" if ratio is not None else " (a run failed, see details)"),
        ours.get("median_round_s"),
        base.get("median_round_s"),
        "s",
        "<= 1.1x" if target else "",
        (ratio is not None and ratio <= 1.1) if target else None,
    )


def _serverapp_work(section: Section, details: dict[str, Any], hospitals: int, rounds: int) -> None:
    """The ServerApp's own work per round, ours vs FedAvg, without Flower's runtime."""
    res = {mode: _child(mode, hospitals, rounds, inline=True) for mode in ("ours", "flower")}
    ours, base = res["ours"], res["flower"]
    ok = "error" not in ours and "error" not in base
    ratio = ours["median_serverapp_s"] / base["median_serverapp_s"] if ok else None
    details[str(hospitals)]["serverapp_work"] = {**res, "ratio": ratio}
    if ok:
        section.keys[f"round_serverapp_s_{hospitals}"] = ours["median_serverapp_s"]
        section.keys[f"baseline_flower_serverapp_s_{hospitals}"] = base["median_serverapp_s"]
        section.keys[f"round_serverapp_ratio_{hospitals}"] = ratio
    section.rows.append(
        Row(
            f"  the ServerApp's own work, {hospitals} hospitals (no runtime)"
            + ("" if ok else " (a run failed, see details)"),
            ours.get("median_serverapp_s"),
            base.get("median_serverapp_s"),
            "s",
        )
    )


def _paired_children(hospitals: int, rounds: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Both sides alternately in one child (``--mode paired``): one interpreter, one Ray start."""
    args = ["--mode", "paired", "--hospitals", str(hospitals), "--rounds", str(rounds)]
    args += ["--repeats", str(repeats), "--pull-interval", str(PULL_S)]
    timeout = TIMEOUT_S * repeats
    run = run_child("bench.round_overhead", args, timeout)
    if run.returncode != 0:
        why = f"no result within {timeout} s" if run.returncode is None else run.stderr[-2000:]
        return {mode: {"mode": mode, "error": why} for mode in ("ours", "flower")}
    out: dict[str, dict[str, Any]] = run.last_json()
    for res in out.values():
        res["wall_s"] = run.wall_s  # of both
    return out


def run(quick: bool = False) -> Section:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    sizes = (QUICK_HOSPITALS,) if quick else SIZES
    details: dict[str, Any] = {"pull_interval_s": PULL_S, "rounds": rounds}
    section = Section(name="round")
    ratios = []
    for hospitals in sizes:
        # The measurement: both sides on the same Flower settings, replies polled every
        # PULL_S (Flower's default 0.1 s quantises a ~0.1 s round into whole polls).
        res = _paired_children(hospitals, rounds, 1 if quick else PAIRED_REPEATS)
        if not quick:
            res["ours-he"] = _child("ours-he", hospitals, rounds, PULL_S)
        ratio = _ratio(res["ours"], res["flower"])
        details[str(hospitals)] = {**res, "ratio": ratio}
        if ratio is not None:
            ratios.append(ratio)
            section.keys[f"round_overhead_ratio_{hospitals}"] = ratio
            section.keys[f"baseline_flower_round_s_{hospitals}"] = res["flower"]["median_round_s"]
            section.keys[f"round_s_{hospitals}"] = res["ours"]["median_round_s"]
        section.rows.append(
            _row(
                f"round, {hospitals} hospitals, ours (none) vs FedAvg",
                res["ours"],
                res["flower"],
                True,
            )
        )
        if "ours-he" in res:
            section.keys[f"round_overhead_ratio_he_{hospitals}"] = _ratio(
                res["ours-he"], res["flower"]
            )
            section.rows.append(
                _row(
                    f"  ours in he mode, {hospitals} hospitals",
                    res["ours-he"],
                    res["flower"],
                    False,
                )
            )
        _serverapp_work(section, details, hospitals, QUICK_ROUNDS if quick else INLINE_ROUNDS)
        if not quick and hospitals == sizes[0]:
            # Lever: Flower's default polling interval, on both sides.
            default = {mode: _child(mode, hospitals, rounds) for mode in ("ours", "flower")}
            lever = _ratio(default["ours"], default["flower"])
            details[str(hospitals)]["default_pull_interval"] = {**default, "ratio": lever}
            section.keys[f"lever_round_overhead_ratio_default_pull_{hospitals}"] = lever
            section.rows.append(
                _row(
                    f"  lever: Flower's default 0.1 s polling, {hospitals} hospitals",
                    default["ours"],
                    default["flower"],
                    False,
                )
            )
    section.keys["round_overhead_ratio"] = max(ratios) if len(ratios) == len(sizes) else None
    section.details = details
    return section


@contextlib.contextmanager
def _one_ray_session() -> Iterator[None]:
    """Start Ray once for several simulations in this process (``--mode paired``).

    Flower's Ray backend starts Ray only if none runs, but shuts it down after
    every simulation; starting it costs seconds (20 s at load 7 on 2 cores), so
    its shutdown waits for the last simulation.
    """
    import ray

    ray.init(
        # As Flower's backend would start it: its workers find this checkout.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
        **_backend_config()["init_args"],
    )
    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = shutdown
        shutdown()


def _measure(
    mode: str, hospitals: int, rounds: int, pull_s: float | None, inline: bool = False, **kw: Any
) -> Any:
    """One configuration's JSON result (rounds 2..R)."""
    with tempfile.TemporaryDirectory(prefix="fedvault-bench-") as tmp:
        if mode.startswith("ours"):
            he = mode == "ours-he"
            clock = run_ours(hospitals, rounds, Path(tmp), pull_s, he=he, inline=inline, **kw)
        else:
            clock = run_flower(hospitals, rounds, mode == "flower-eval", pull_s, inline=inline)
    durations = _durations(clock.ends)[: rounds - 1]  # rounds 2..R
    phases = clock.phases(1, rounds)
    phases["other"] = statistics.median(durations) - sum(phases.values())
    out = {
        "mode": mode,
        "hospitals": hospitals,
        "round_s": durations,
        "median_round_s": statistics.median(durations),
        "phases_s": phases,
    }
    if inline:  # the ServerApp's own work: each round less its clients' answers
        clients = clock.per_round("simulated_clients", 1, rounds)
        own = [d - c for d, c in zip(durations, clients, strict=True)]
        out["serverapp_s"] = own
        out["median_serverapp_s"] = statistics.median(own)
    return out


def _pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs as one result: every measured round, and each phase's median."""
    rounds = [r for res in results for r in res["round_s"]]
    phases = {
        name: statistics.median(res["phases_s"].get(name, 0.0) for res in results)
        for name in results[0]["phases_s"]
    }
    return {
        **results[0],
        "runs": len(results),
        "round_s": rounds,
        "median_round_s": statistics.median(rounds),
        "run_medians_s": [res["median_round_s"] for res in results],
        "phases_s": phases,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.round_overhead")
    parser.add_argument(
        "--mode",
        choices=("ours", "ours-he", "flower", "flower-eval", "paired"),
        required=True,
        help="paired: ours and flower alternately, --repeats times each, on one Ray session",
    )
    parser.add_argument("--repeats", type=int, default=1, help="paired: runs of each side")
    parser.add_argument("--hospitals", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--pull-interval", type=float, default=None)
    parser.add_argument(
        "--profile", type=Path, default=None, help="ours: cProfile the ServerApp into this file"
    )
    parser.add_argument(
        "--inline",
        action="store_true",
        help="no Flower runtime: hospitals answer in the ServerApp's thread (its own work)",
    )
    args = parser.parse_args(argv)
    if args.mode == "paired":
        runs: dict[str, list[Any]] = {"ours": [], "flower": []}
        with _one_ray_session():
            for _ in range(args.repeats):
                for mode, results in runs.items():
                    results.append(_measure(mode, args.hospitals, args.rounds, args.pull_interval))
        out = {mode: _pooled(results) for mode, results in runs.items()}
    else:
        kw = {"profile": args.profile} if args.mode.startswith("ours") else {}
        out = _measure(
            args.mode, args.hospitals, args.rounds, args.pull_interval, inline=args.inline, **kw
        )
    print(json.dumps(out))


if __name__ == "__main__":
    # Run the *imported* module's main: Ray pickles functions of ``__main__`` by
    # value with every message, so a worker-side cache defined here would not persist.
    from bench.round_overhead import main as _main

    _main(sys.argv[1:])
