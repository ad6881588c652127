"""The coordinator's Flower ServerApp: a durable round loop around :class:`SecureFedAvg`.

Flower's ``Strategy.start`` always begins at round 1. A consortium job must
survive a coordinator restart, so this loop is keyed by the *job name* in the
round store: it finds the last committed round and its global model (a
ciphertext in ``he`` mode) and goes on from there. Each round is committed in
one transaction — round row, participants, new global model, ledger rows and
audit events — or not at all.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedvault.config import JobConfig, SecureAggregation
from fedvault.coordinator.aggregation import aggregation_mode
from fedvault.coordinator.key_ceremony import KeyCeremony, KeyDirectory
from fedvault.coordinator.metrics import observe_commit, observe_round
from fedvault.coordinator.records import (
    AuditEvent,
    ModelBlob,
    Participation,
    RoundCommit,
    RoundView,
)
from fedvault.coordinator.report import ReportBuilder, summarise, write_report
from fedvault.coordinator.round_events import round_committed, round_failed, round_started
from fedvault.coordinator.run_settings import RunSettings
from fedvault.coordinator.store import RoundStore
from fedvault.coordinator.store_models import utcnow
from fedvault.coordinator.strategy import EvalSpec, RoundCollector, RoundOutcome, SecureFedAvg
from fedvault.errors import FedvaultError, InvalidConfigError, StoreError
from fedvault.fingerprint import TaskFingerprint, fingerprint_task
from fedvault.messages import (
    SUMMARY_KEY,
    CeremonyReply,
    HelloRequest,
    ModelPayload,
    RefusalCode,
    instruction_config,
    payload_to_record,
    round_context,
)
from fedvault.npz import arrays_from_bytes, arrays_to_bytes
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.secagg import SecAggParams, UnmaskingSession
from fedvault.task_registry import LoadedTask, load_task

__all__ = [
    "CoordinatorSettings",
    "RoundObserver",
    "app",
    "make_server_app",
    "run_job",
    "settings_from_run_config",
]

log = logging.getLogger("fedvault.coordinator")


@dataclass(frozen=True)
class CoordinatorSettings:
    """Everything the coordinator needs to run (or resume) one job."""

    job: JobConfig
    store_url: str
    task: LoadedTask  # the initial model's architecture, the metrics, the fingerprint
    public_context: HeContext | None = None  # he mode: public key only
    key_epoch: int = 0
    report_dir: Path | None = None
    # How long to wait for a quorum of hospitals to connect, and for every
    # key-ceremony reply; None: the job's round timeout (a ceremony is a round
    # of messages to every hospital, so it gets the same window).
    node_wait_s: float | None = None
    # Deployment: no public context up front; the custodian hospital creates it
    # in a key ceremony that the coordinator relays (see key_ceremony.py).
    key_directory: KeyDirectory | None = None
    custodian: str = ""
    pause_poll_s: float = 5.0
    # AES-256-GCM key for blobs that are not already ciphertext (from the coordinator kit).
    at_rest_key: bytes | None = field(default=None, repr=False)
    consortium: str = ""  # named in the job summary hospitals keep with their models

    @cached_property
    def fingerprint(self) -> TaskFingerprint:
        """The coordinator's fingerprint of the job's task; every hospital must match it."""
        return fingerprint_task(self.task.task, self.task.module)

    @property
    def eval_spec(self) -> EvalSpec:
        """What the strategy needs of the task's metrics to check and pool evaluations."""
        task = self.task.task
        return EvalSpec(
            kind=task.kind, num_classes=task.num_classes, extra_metrics=tuple(task.metrics)
        )


class RoundObserver(Protocol):
    """Hooks for progress displays; the loop works without one."""

    def on_start(self, job: JobConfig, resumed_after: int) -> None:
        """The job starts, or resumes after committed round ``resumed_after`` (0: fresh)."""
        ...

    def on_round(self, view: RoundView) -> None:
        """A round was committed."""
        ...

    def on_round_failed(self, number: int, attempt: int, reason: str) -> None:
        """An attempt at round ``number`` failed for ``reason``."""
        ...


class _LogObserver:
    def on_start(self, job: JobConfig, resumed_after: int) -> None:
        if resumed_after:
            log.info("job %s: resuming after committed round %d", job.job, resumed_after)
        else:
            log.info("job %s: starting (%d rounds)", job.job, job.rounds)

    # The loop itself logs each round's start, commit and failure (round_events).
    def on_round(self, view: RoundView) -> None:
        log.debug("round %d evaluated: accuracy=%s", view.number, view.eval_accuracy)

    def on_round_failed(self, number: int, attempt: int, reason: str) -> None:
        pass


def _initial_model(
    settings: CoordinatorSettings, public: HeContext | None, key_epoch: int
) -> ModelPayload:
    """The seeded initial model; in ``he`` mode encrypted under the public key."""
    torch.manual_seed(settings.job.seed)
    task = settings.task.task
    model = task.build_model()
    state = model.state_dict()  # only what the task shares travels (adapters, say)
    weights = {k: state[k].detach().cpu().numpy() for k in task.shared_names(model)}
    mode = aggregation_mode(settings.job.secure_aggregation)
    return mode.initial_model(weights, public, key_epoch=key_epoch, job=settings.job.job)


def _to_blob(number: int, model: ModelPayload, total_weight: float) -> ModelBlob:
    if model.envelope is not None:
        return ModelBlob(round=number, kind="bfv", blob=model.envelope, total_weight=total_weight)
    assert model.arrays is not None
    return ModelBlob(
        round=number, kind="plain", blob=arrays_to_bytes(model.arrays), total_weight=total_weight
    )


def _from_blob(blob: ModelBlob) -> ModelPayload:
    if blob.kind == "bfv":
        return ModelPayload(envelope=blob.blob)
    return ModelPayload(arrays=arrays_from_bytes(blob.blob))


def _enrolled_nodes(store: RoundStore | None) -> dict[int, str] | None:
    """Node id -> hospital from the coordinator's enrolment records.

    ``None`` when nothing was enrolled (a simulation: Flower made the nodes,
    nobody claims a key).
    """
    if store is None:
        return None
    enrolled = {
        int(e.detail["node_id"]): str(e.detail["hospital"])  # type: ignore[call-overload]
        for e in store.audit_events()
        if e.kind == "node_enrolled"
    }
    return enrolled or None


#: Replies pulled from the SuperLink per request: the most updates the ServerApp
#: holds at once, whatever the size of the consortium.
_PULL_BATCH = 4
#: Seconds between polls while no reply has arrived (Flower's own loop waits 3 s):
#: from the first to the last, doubling, so a quick exchange (the unmask query) is
#: not held up for a whole second and a slow one does not poll faster than 1/s.
_FIRST_POLL_S = 0.05
_POLL_S = 1.0
#: Pull requests a second the longest pause allows: a small consortium's last reply
#: waits ~0.125 s, not ~0.5 s, for the next poll; a large one polls as before.
_PULLS_PER_S = 4.0
#: In a simulation each pull checks every outstanding id (Flower's in-memory link
#: state, ~5 us each under its lock and the GIL: 9 ms a pull at 2,000 hospitals).
#: Above this many outstanding, pulls are spaced out in proportion, so checking
#: costs the same per second at any size; the round's last replies are pulled at
#: Flower's interval.
_IN_MEMORY_IDS_PER_PULL = 200


def _poll_cap(outstanding: int) -> float:
    """Longest pause between polls with ``outstanding`` replies (one pull per batch)."""
    pulls = -(-outstanding // _PULL_BATCH)
    return min(_POLL_S, pulls / _PULLS_PER_S)


def _in_memory_pause(pull_interval: float, outstanding: int) -> float:
    """Seconds to wait before pulling ``outstanding`` replies from an in-memory grid again."""
    return pull_interval * max(1.0, outstanding / _IN_MEMORY_IDS_PER_PULL)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _in_memory_poll_s(grid: Grid) -> float | None:
    """The poll interval of Flower's in-memory grid (a simulation); ``None`` for any other.

    Its replies already live in this process (the simulation's link state), so
    pulling them all in one call holds no more in memory than pulling a few,
    and a pull is a function call, not a request to a SuperLink: it is polled
    the way Flower's own ``send_and_receive`` polls it, every ``pull_interval``
    (25 pulls of 4 per poll cost 100 hospitals ~8 ms each time, under Flower's
    link-state lock). Checked through ``sys.modules``: importing the grid's
    module takes ~2 s, and a grid of a module never imported is not one.
    """
    module = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    if module is None or not isinstance(grid, module.InMemoryGrid):
        return None
    return float(grid.pull_interval)


def _wait_for_nodes(grid: Grid, needed: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise StoreError(
                f"only {connected} of the {needed} hospitals needed are connected after "
                f"{timeout_s:.0f} s; start their daemons or lower min_hospitals"
            )
        time.sleep(1.0)


class _RoundRunner:
    def __init__(
        self, grid: Grid, settings: CoordinatorSettings, store: RoundStore, job_id: int
    ) -> None:
        self.grid, self.settings, self.store, self.job_id = grid, settings, store, job_id
        self.job = settings.job
        self.key_epoch = settings.key_epoch
        self.public = settings.public_context
        self.node_wait_s = (
            self.job.round_timeout_s if settings.node_wait_s is None else settings.node_wait_s
        )
        self.enrolled = _enrolled_nodes(store)
        self.ceremony: KeyCeremony | None = None
        if self.job.secure_aggregation is SecureAggregation.HE and self.public is None:
            if settings.key_directory is None or not settings.custodian:
                raise StoreError("he mode needs a public context or a key directory and custodian")
            self.ceremony = KeyCeremony(
                settings.key_directory,
                custodian=settings.custodian,
                store=store,
                job_id=job_id,
                timeout_s=self.node_wait_s,
                enrolled=self.enrolled,
            )
            self.key_epoch = self.ceremony.epoch
        self.strategy: SecureFedAvg | None = None
        self.eval_spec = settings.eval_spec
        self.fingerprint_json = settings.fingerprint.to_json()
        self.summary = ""  # the job's report so far, compact (see report.summarise)
        # Every hospital the key ceremony ever saw (node id -> name): one that is
        # offline when a round starts is not asked, but recorded as missing.
        self.known: dict[int, str] = {}
        self.attempts: dict[int, int] = {}  # round -> training attempts made by this runner
        self.started_at: dict[int, datetime] = {}  # round -> when its latest attempt started

    def ensure_keys(self) -> None:
        """Every connected hospital holds the current key before a round starts."""
        _wait_for_nodes(self.grid, self.job.quorum, self.node_wait_s)
        if self.ceremony is not None:
            self.public = self.ceremony.ensure(self.grid)
        if self.strategy is None:
            self.strategy = SecureFedAvg(
                job=self.job,
                public_context=self.public,
                key_epoch=self.key_epoch,
                enrolled=self.enrolled,
                eval_spec=self.eval_spec,
            )

    def _config(self, server_round: int) -> ConfigRecord:
        return instruction_config(
            self.job.to_json(), server_round, self.key_epoch, self.fingerprint_json, self.summary
        )

    def _name(self, node: int) -> str:
        return self.known.get(node, f"node-{node}")

    def _exchange(
        self, messages: list[Message], on_reply: Callable[[Message], None]
    ) -> dict[int, str]:
        """Send ``messages``; hand each good reply to ``on_reply`` as it arrives.

        Returns why each other addressed node gave none.

        Replies are pulled a few at a time and handed on at once, never
        collected: the ServerApp holds at most :data:`_PULL_BATCH` updates,
        however many hospitals the consortium has. Flower's in-memory grid (a
        simulation, whose replies are in this process anyway) is pulled whole,
        every ``pull_interval``, less often while more than
        :data:`_IN_MEMORY_IDS_PER_PULL` replies are outstanding (see
        :func:`_in_memory_poll_s`).

        Every instruction lives only as long as the round waits for it (its
        TTL): the SuperLink then refuses a straggler's late reply, and a hospital
        that reconnects after a crash is never handed an instruction the round
        stopped waiting for. Flower answers for an offline or expired node with
        an error message from the SuperLink itself; it is matched to the node
        it was addressed to through ``reply_to_message_id``.
        """
        timeout = self.job.round_timeout_s
        for msg in messages:
            msg.metadata.ttl = timeout
        ids = list(self.grid.push_messages(messages))
        # Pushing gives each message its id; a message the SuperLink did not queue has none.
        addressed = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        missing: dict[int, str] = {
            node: "the instruction could not be queued at the SuperLink"
            for msg_id, node in addressed.items()
            if msg_id not in ids
        }
        del messages
        outstanding = set(ids)
        answered: set[int] = set()
        deadline = time.monotonic() + timeout
        in_memory = _in_memory_poll_s(self.grid)
        pause = _FIRST_POLL_S
        while outstanding and time.monotonic() < deadline:
            arrived = 0
            batch = _PULL_BATCH if in_memory is None else len(outstanding)
            for chunk in _chunks(sorted(outstanding), batch):
                for reply in self.grid.pull_messages(chunk):
                    arrived += 1
                    outstanding.discard(reply.metadata.reply_to_message_id)
                    node = addressed.get(
                        reply.metadata.reply_to_message_id, reply.metadata.src_node_id
                    )
                    if reply.has_error():
                        missing[node] = self._why_missing(reply, timeout)
                    else:
                        answered.add(reply.metadata.src_node_id)
                        on_reply(reply)
                    del reply  # handed on: the collector keeps only the running sum
            # In memory, every pull waits its interval, as Flower's own loop does: pulling
            # again at once after replies held the link state's lock and the GIL from the
            # threads that deliver the rest (3x the pulls).
            if outstanding and in_memory is not None:
                time.sleep(_in_memory_pause(in_memory, len(outstanding)))
            elif outstanding and not arrived:
                time.sleep(pause)
                pause = min(2 * pause, _poll_cap(len(outstanding)))
        for msg_id in outstanding:
            node = addressed[msg_id]
            if node not in answered:
                missing.setdefault(node, f"no reply within {timeout:.0f} s")
        return missing

    @staticmethod
    def _why_missing(reply: Message, timeout: float) -> str:
        if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
            return "offline: its SuperNode stopped sending heartbeats"
        if reply.error.code in (
            ErrorCode.MESSAGE_UNAVAILABLE,
            ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
        ):
            return f"no reply within {timeout:.0f} s"
        return f"client error {reply.error.code}: {reply.error.reason}"

    def train(self, number: int, model: ModelPayload) -> RoundOutcome:
        self.started_at[number] = utcnow()  # waiting for hospitals and keys is part of it
        self.ensure_keys()
        assert self.strategy is not None
        # Each attempt gets its own round context (a masked round's nonce).
        attempt = self.attempts[number] = self.attempts.get(number, 0) + 1
        round_started(self.job.job, number, attempt)
        if self.ceremony is not None:
            self.known.update(self.ceremony.hospitals)
        config = self._config(number)
        try:
            names, unmasking = self._mask_plan(number, model, attempt)
        except InvalidConfigError as exc:  # e.g. fewer than three hospitals connected
            return RoundOutcome(failure=f"the masked round cannot start: {exc}")
        if unmasking is not None:
            config["participants"] = list(unmasking.context.participants)
            config["attempt"] = attempt
        messages = list(
            self.strategy.configure_train(number, payload_to_record(model), config, self.grid)
        )
        if unmasking is not None:  # only the hospitals the masks are shared with
            messages = [m for m in messages if m.metadata.dst_node_id in names]
        asked = {m.metadata.dst_node_id for m in messages}
        collector = self.strategy.round_collector(number, unmasking)
        missing = self._exchange(messages, collector.add)
        self._unmask(collector)
        for node in self.known.keys() - asked:
            missing[node] = "offline: not connected when the round started"
        outcome = collector.finish()
        for node, reason in sorted(missing.items()):
            hospital = self._name(node)
            # record(): a node may have answered in this hospital's name (the
            # store keeps one row per hospital and round).
            outcome.record(
                Participation(hospital=hospital, node_id=node, status="failed", reason=reason)
            )
            outcome.audit.append(
                AuditEvent(
                    kind="round_no_reply",
                    actor=hospital,
                    detail={"round": number, "reason": reason},
                )
            )
        return outcome

    def _mask_plan(
        self, number: int, model: ModelPayload, attempt: int
    ) -> tuple[dict[int, str], UnmaskingSession | None]:
        """A masked attempt's participants (node -> hospital) and unmasking session.

        ``({}, None)`` for an unmasked job (``none`` mode, ``masking`` off, fewer
        than three hospitals in the consortium: with two, each learns the other's
        update from the aggregate anyway).

        Raises
        ------
        InvalidConfigError
            Fewer than three named hospitals are connected: the attempt fails.
        """
        params = SecAggParams()
        if not self.job.masked or self.job.hospitals < params.min_participants:
            return {}, None
        assert self.public is not None
        names = self._hospital_names(list(self.grid.get_node_ids()))
        context = round_context(
            self.job.job, number, self.key_epoch, model, tuple(names.values()), attempt
        )
        return names, UnmaskingSession(context, params, self.public.params.plain_modulus)

    def _hospital_names(self, nodes: list[int]) -> dict[int, str]:
        """Connected nodes' hospitals: enrolled or seen in a ceremony, else asked (simulation)."""
        known = {**(self.enrolled or {}), **self.known}
        names = {n: known[n] for n in nodes if n in known}
        unknown = [n for n in nodes if n not in known]
        if unknown and self.enrolled is None:  # simulation: nobody enrols, so ask
            replies: list[Message] = []
            hello = HelloRequest().to_content()
            self._exchange(
                [Message(hello, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown],
                replies.append,
            )
            for reply in replies:
                try:
                    # Only the name: a simulation's key epoch 0 is no ceremony epoch.
                    names[reply.metadata.src_node_id] = CeremonyReply.from_message(reply).hospital
                except FedvaultError as exc:
                    log.warning("node %d: no usable hello: %s", reply.metadata.src_node_id, exc)
            self.known.update(names)
        return names

    def _unmask(self, collector: RoundCollector) -> None:
        """A masked round's one extra round trip: ask the survivors to unmask the sum."""
        queries = collector.unmask_queries()
        if not queries:
            return
        messages = [
            Message(q.to_content(), dst_node_id=node, message_type=MessageType.QUERY)
            for node, q in queries.items()
        ]
        missing = self._exchange(messages, collector.add_unmask)
        for node, reason in sorted(missing.items()):
            log.warning("round unmask: %s did not answer: %s", self._name(node), reason)

    def evaluate(self, number: int, model: ModelPayload) -> None:
        assert self.strategy is not None
        messages = list(
            self.strategy.configure_evaluate(
                number, payload_to_record(model), self._config(number), self.grid
            )
        )
        replies: list[Message] = []  # evaluations are a few numbers each
        self._exchange(messages, replies.append)
        evals = self.strategy.collect_evaluate(number, replies)
        self.store.record_evaluation(
            self.job_id, number, evaluations=evals.hospitals, pooled=evals.pooled(self.eval_spec)
        )

    def announce(self, summary: str) -> None:
        """Hand every connected hospital the job's final report.

        Each keeps it beside its model versions (the model card of an export).
        Best effort: a hospital that is offline now keeps the summary of the last
        round it took part in.
        """
        nodes = list(self.grid.get_node_ids())
        if not nodes or not summary:
            return
        messages = []
        for node in nodes:
            record = ConfigRecord({"job": self.job.job, "summary": summary})
            msg = Message(
                RecordDict({SUMMARY_KEY: record}), dst_node_id=node, message_type=MessageType.QUERY
            )
            messages.append(msg)
        kept: list[Message] = []
        self._exchange(messages, kept.append)
        kept = [r for r in kept if SUMMARY_KEY in r.content.config_records]
        log.info(
            "job %s: final summary handed to %d of %d hospitals",
            self.job.job,
            len(kept),
            len(nodes),
        )


def run_job(
    grid: Grid, settings: CoordinatorSettings, observer: RoundObserver | None = None
) -> str:
    """Run or resume ``settings.job`` to completion; returns the final job status."""
    obs: RoundObserver = observer or _LogObserver()
    job = settings.job
    with RoundStore(settings.store_url, at_rest_key=settings.at_rest_key) as store:
        job_row = store.open_job(job.job, job.to_dict())
        if job_row.status in ("finished", "stopped"):
            log.info("job %s is already %s", job.job, job_row.status)
            return job_row.status
        done = store.last_committed_round(job_row.id)
        obs.on_start(job, done)
        _audit_start(store, settings, job_row.id, done)
        runner = _RoundRunner(grid, settings, store, job_row.id)
        reports = ReportBuilder(store, job.job)  # re-reads only the newest rounds
        runner.summary = _summary(reports, settings)
        runner.ensure_keys()
        model = _latest_model(store, settings, runner, job_row.id)
        for number in range(done + 1, job.rounds + 1):
            if _wait_while_paused(store, job.job, settings.pause_poll_s) == "stop":
                log.info("job %s stopped by an operator before round %d", job.job, number)
                _write_report(store, reports, settings)
                return "stopped"
            started = time.monotonic()
            outcome = _train_round(runner, store, job_row.id, job, number, model, obs)
            if outcome is None:
                store.set_job_status(job_row.id, "failed")
                _write_report(store, reports, settings)
                return "failed"
            model, view = _commit_round(
                runner, store, reports, settings, job_row.id, number, outcome
            )
            observe_round(job.job, time.monotonic() - started)
            round_committed(job.job, view)
            obs.on_round(view)
        final = _committed_round(store, job_row.id, job.rounds)
        if not final.evaluations:
            # The last model has no next round to carry its evaluation.
            runner.evaluate(final.number, model)
            obs.on_round(_committed_round(store, job_row.id, final.number))
        store.set_job_status(job_row.id, "finished")
        runner.announce(_write_report(store, reports, settings) or _summary(reports, settings))
        return "finished"


def _audit_start(store: RoundStore, settings: CoordinatorSettings, job_id: int, done: int) -> None:
    """Record that the job starts (or resumes after round ``done``), and with which task."""
    job = settings.job
    store.append_audit(
        AuditEvent(
            kind="job_resumed" if done else "job_started",
            actor="coordinator",
            detail={
                "after_round": done,
                "mode": job.secure_aggregation.value,
                "task": job.task,
                "task_fingerprint": settings.fingerprint.digest,
                "task_version": settings.fingerprint.version,
            },
        ),
        job_id=job_id,
    )


def _latest_model(
    store: RoundStore, settings: CoordinatorSettings, runner: _RoundRunner, job_id: int
) -> ModelPayload:
    """The last committed global model, or the seeded initial one, saved, for a new job."""
    latest = store.latest_model(job_id)
    if latest is None:
        initial = _initial_model(settings, runner.public, runner.key_epoch)
        latest = store.save_initial_model(job_id, _to_blob(0, initial, 1.0))
    return _from_blob(latest)


def _train_round(
    runner: _RoundRunner,
    store: RoundStore,
    job_id: int,
    job: JobConfig,
    number: int,
    model: ModelPayload,
    obs: RoundObserver,
) -> RoundOutcome | None:
    """Train round ``number`` until a quorum contributes, up to the job's attempts.

    ``None`` when every attempt failed (each is recorded as a failed round).
    """
    for attempt in range(1, job.max_round_attempts + 1):
        candidate = runner.train(number, model)
        if candidate.model is not None and candidate.accepted >= job.quorum:
            return candidate
        reason = (
            (f"{candidate.failure}; " if candidate.failure else "")
            + f"{candidate.accepted} of {job.quorum} required hospitals contributed: "
            + "; ".join(
                f"{p.hospital} {p.status}: {p.reason}"
                for p in candidate.participations
                if p.status != "ok"
            )
        )
        store.record_failed_round(
            job_id,
            number,
            reason=reason,
            participations=candidate.participations,
            started_at=runner.started_at.get(number),
        )
        round_failed(job.job, number, attempt, reason)
        # Each refusal, rejection and missing reply of the attempt is its own
        # audit row, as it is for a committed round (round.failed sums them up).
        for event in candidate.audit:
            store.append_audit(event, job_id=job_id)
        obs.on_round_failed(number, attempt, reason)
        if _final_refusal(candidate.participations):
            break  # spent budgets and refused consent do not come back
    return None


def _commit_round(
    runner: _RoundRunner,
    store: RoundStore,
    reports: ReportBuilder,
    settings: CoordinatorSettings,
    job_id: int,
    number: int,
    outcome: RoundOutcome,
) -> tuple[ModelPayload, RoundView]:
    """Commit round ``number`` in one transaction and refresh the job summary.

    Returns the new global model and the round as committed.
    """
    assert outcome.model is not None
    with observe_commit(settings.job.job):
        store.commit_round(
            job_id,
            RoundCommit(
                number=number,
                model=_to_blob(number, outcome.model, outcome.total_weight),
                participations=tuple(outcome.participations),
                train_loss=outcome.train_loss,
                audit=tuple(outcome.audit),
                previous_evaluations=tuple(outcome.evaluations.hospitals),
                previous_pooled=outcome.evaluations.pooled(runner.eval_spec),
                started_at=runner.started_at.get(number),
            ),
        )
    runner.summary = _write_report(store, reports, settings) or _summary(reports, settings)
    # The summary's build just read the round back: no second read of it.
    view = reports.newest
    if view is None or view.number != number:
        view = _committed_round(store, job_id, number)
    return outcome.model, view


def _committed_round(store: RoundStore, job_id: int, number: int) -> RoundView:
    """Round ``number`` as committed, read alone.

    Re-reading every round after each one made a job's reads grow with
    rounds x hospitals.
    """
    rounds = store.rounds(job_id, after=number - 1)
    (view,) = [v for v in rounds if v.number == number and v.status == "committed"]
    return view


def _wait_while_paused(store: RoundStore, job_name: str, poll_s: float) -> str:
    """Honour operators' stop/pause requests between rounds."""
    while (control := store.requested_control(job_name)) == "pause":
        time.sleep(poll_s)
    return control


# Refusals that retrying a round cannot change: a spent budget, a task a hospital
# does not run, cannot load or has not allowed. Decided on the code alone: the
# reason is free text. No code (a failure, a rejected reply) and UNKNOWN (a
# refusal from a hospital without refusal codes) are retried.
_FINAL_REFUSALS = frozenset(
    {
        RefusalCode.BUDGET_EXHAUSTED,
        RefusalCode.POLICY,
        RefusalCode.TASK_MISMATCH,
        RefusalCode.CONFIG,
    }
)


def _final_refusal(participations: Sequence[Participation]) -> bool:
    """Whether retrying the round cannot help.

    It cannot when every hospital that did not contribute refused with a final code.
    """
    missing = [p for p in participations if p.status != "ok"]
    return bool(missing) and all(p.code in _FINAL_REFUSALS for p in missing)


def _summary(reports: ReportBuilder, settings: CoordinatorSettings) -> str:
    """The compact job report hospitals keep with their model versions (JSON)."""
    report = reports.build()
    return json.dumps(summarise(report, consortium=settings.consortium).to_json(), allow_nan=False)


def _write_report(store: RoundStore, reports: ReportBuilder, settings: CoordinatorSettings) -> str:
    """Write report.json/.png where configured; return the compact summary it implies."""
    if settings.report_dir is None:
        return ""
    report = reports.build()
    write_report(store, settings.job.job, settings.report_dir, report=report)
    return json.dumps(summarise(report, consortium=settings.consortium).to_json(), allow_nan=False)


def make_server_app(
    settings: Callable[[Context], CoordinatorSettings],
    observer: RoundObserver | None = None,
) -> ServerApp:
    """A ServerApp running the job that ``settings(context)`` describes."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        status = run_job(grid, settings(context), observer)
        if status != "finished":  # recorded in the store and the report; the caller reads it
            log.warning("job ended with status %r; see the audit log and the report", status)

    return app


# --- deployment: the ServerApp `flwr run` starts on the SuperLink -------------


def settings_from_run_config(context: Context) -> CoordinatorSettings:
    """Settings the coordinator daemon passes as Flower run config (see run_settings.py)."""
    run = RunSettings.from_context(context)
    from fedvault.kit import Kit, KitKind

    kit = Kit.load(run.kit, expected_kind=KitKind.COORDINATOR)
    return CoordinatorSettings(
        job=run.job,
        store_url=run.store,
        task=load_task(run.job.task),
        report_dir=run.state_dir,
        key_directory=KeyDirectory(run.state_dir / "keys"),
        custodian=run.custodian,
        at_rest_key=kit.at_rest_key(),
        consortium=kit.consortium,
    )


app = make_server_app(settings_from_run_config)
