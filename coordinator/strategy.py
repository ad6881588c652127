"""The coordinator's Flower strategy: FedAvg over encrypted (or plaintext) updates.

In ``he`` mode the strategy holds only the public HE context. Each hospital
has already multiplied its model by its sample count before encrypting, so
sample-weighted FedAvg reduces to a ciphertext *sum* plus a plaintext total
weight: the coordinator never divides, never decrypts, never sees a number.

Every reply is validated before it can touch the running sum (see
:meth:`SecureFedAvg.collect_train`); a rejected reply is logged, recorded with
its reason (a ``rejected`` participation and an ``update_rejected`` audit
event) and leaves the aggregate untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvault.config import JobConfig
from fedvault.coordinator.aggregation import (
    AggregationMode,
    ModelLayout,
    UpdateAggregator,
    aggregation_mode,
)
from fedvault.coordinator.records import AuditEvent, HospitalEval, Participation
from fedvault.errors import FedvaultError, MalformedUpdateError
from fedvault.messages import (
    CONFIG_KEY,
    ENVELOPE_KEY,
    MODEL_KEY,
    EvalReply,
    ModelPayload,
    ReplyStatus,
    TrainReply,
    UnmaskAnswer,
    UnmaskQuery,
    payload_to_record,
)
from fedvault.metrics import EvalResult, pool
from fedvault.privacy.he import parse_envelope
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.secagg import UnmaskingSession
from fedvault.privacy.secagg_he import apply_correction
from fedvault.privacy.secagg_messages import MaskedShares, SecAggError, StageError, UnmaskError
from fedvault.task import TaskKind

__all__ = ["EvalSpec", "Evaluations", "RoundCollector", "RoundOutcome", "SecureFedAvg"]

log = logging.getLogger("fedvault.coordinator")


@dataclass(frozen=True)
class EvalSpec:
    """What the coordinator knows of the task's metrics.

    Enough to check and pool the hospitals' evaluations (:mod:`fedvault.metrics`),
    nothing that trains.
    """

    kind: TaskKind = "multiclass"
    num_classes: int = 2
    extra_metrics: tuple[str, ...] = ()

    def parse(self, text: str, hospital: str) -> EvalResult:
        """Check ``hospital``'s metrics JSON against the task's metrics and parse it."""
        try:
            return EvalResult.from_json(
                text,
                kind=self.kind,
                num_classes=self.num_classes,
                extra_metrics=self.extra_metrics,
            )
        except MalformedUpdateError as exc:
            raise MalformedUpdateError(f"{hospital}'s evaluation: {exc}") from exc


@dataclass
class Evaluations:
    """Hospitals' evaluations of one model, and the metrics pooled across them."""

    hospitals: list[HospitalEval] = field(default_factory=list)
    results: list[EvalResult] = field(default_factory=list)

    def add(self, evaluation: HospitalEval, result: EvalResult | None) -> None:
        """Add a hospital's evaluation, and its metrics (if it sent any) to the pool."""
        self.hospitals.append(evaluation)
        if result is not None:
            self.results.append(result)

    def pooled(self, spec: EvalSpec) -> dict[str, float]:
        """The task's metrics pooled over the hospitals that sent them."""
        return pool(spec.kind, self.results, num_classes=spec.num_classes)


def _hospital_eval(
    spec: EvalSpec, hospital: str, text: str, accuracy: float, loss: float, samples: int
) -> tuple[HospitalEval, EvalResult | None]:
    """A hospital's evaluation record, from its metrics JSON when it sent one."""
    if not text:
        return HospitalEval(hospital=hospital, accuracy=accuracy, loss=loss, samples=samples), None
    result = spec.parse(text, hospital)
    evaluation = HospitalEval(
        hospital=hospital,
        accuracy=result.metrics.get("accuracy") if spec.kind != "regression" else None,
        loss=result.loss,
        samples=result.samples,
        metrics=dict(result.metrics),
    )
    return evaluation, result


@dataclass
class RoundOutcome:
    """The validated, aggregated result of one training round."""

    model: ModelPayload | None = None
    total_weight: float = 0.0
    train_loss: float | None = None
    participations: list[Participation] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    # Hospitals' evaluation of the model they received (the previous round's).
    evaluations: Evaluations = field(default_factory=Evaluations)
    # Why the attempt failed although updates arrived (a masked round that
    # could not be unmasked); empty otherwise.
    failure: str = ""
    # The hospitals in ``participations``: each reply asks, a scan made a round O(hospitals²).
    _hospitals: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._hospitals.update(p.hospital for p in self.participations)

    @property
    def accepted(self) -> int:
        """How many hospitals contributed an update."""
        return sum(p.status == "ok" for p in self.participations)

    def record(self, participation: Participation) -> bool:
        """Record a hospital's part in the round once; ``False`` if it already has one.

        The store keeps one row per hospital and round, so a second row would
        make the whole round's commit fail: a second reply in the same name (a
        duplicate, or a node that first sent garbage) is only logged and
        audited. Use this for every participation, also the ServerApp's.
        """
        if self.has(participation.hospital):
            return False
        self.participations.append(participation)
        self._hospitals.add(participation.hospital)
        return True

    def has(self, hospital: str) -> bool:
        """Whether ``hospital`` already has its part in the round recorded."""
        return hospital in self._hospitals


class SecureFedAvg(Strategy):
    """Sample-weighted FedAvg whose ``he`` mode never decrypts.

    Parameters
    ----------
    job
        The job being run (mode, quorum).
    public_context
        The consortium's HE context *without* its secret key (``he`` mode).
    key_epoch
        Current key epoch; updates under another epoch are rejected.
    enrolled
        Node id -> hospital, from enrolment (each hospital's node key is
        registered by the coordinator under that hospital's name). When given, a
        reply whose claimed hospital differs from its node's enrolment, or from a
        node enrolled for no hospital, is rejected: otherwise one hospital could
        reply in another's name, and since only a hospital's first reply of a
        round counts, shut the real one out. ``None`` (simulation): no binding.
    """

    def __init__(
        self,
        *,
        job: JobConfig,
        public_context: HeContext | None,
        key_epoch: int = 0,
        enrolled: Mapping[int, str] | None = None,
        eval_spec: EvalSpec | None = None,
    ) -> None:
        # Everything that depends on he/none (aggregator, payloads, context).
        self.mode: AggregationMode[Any, Any] = aggregation_mode(job.secure_aggregation)
        self.mode.check_context(public_context)
        self.job = job
        self.public_context = public_context
        self.key_epoch = key_epoch
        self.enrolled = None if enrolled is None else dict(enrolled)
        self.eval_spec = eval_spec or EvalSpec()
        # Layout of the model sent for a round (see expect_model): every update
        # must match it, so a hostile first reply cannot set the layout.
        self._expected: dict[int, ModelLayout | None] = {}

    # --- Flower Strategy interface -------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Training instructions for every connected node; remembers the model's layout."""
        self.expect_model(server_round, arrays)
        return self._messages(arrays, config, grid, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model and training metrics (see :meth:`collect_train`)."""
        outcome = self.collect_train(server_round, replies)
        if outcome.model is None:
            return None, None
        metrics = MetricRecord({"num-examples": outcome.total_weight})
        if outcome.train_loss is not None:
            metrics["train-loss"] = outcome.train_loss
        return payload_to_record(outcome.model), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation instructions for every connected node."""
        return self._messages(arrays, config, grid, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The pooled evaluation metrics; ``None`` when no hospital evaluated."""
        evals = self.collect_evaluate(server_round, replies)
        total = sum(e.samples for e in evals.hospitals)
        if not total:
            return None
        pooled = {k: float(v) for k, v in evals.pooled(self.eval_spec).items()}
        pooled.setdefault("loss", sum(e.loss * e.samples for e in evals.hospitals) / total)
        return MetricRecord({**pooled, "num-examples": total})

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "SecureFedAvg: mode=%s, hospitals=%d, quorum=%d, key epoch=%d",
            self.job.secure_aggregation.value,
            self.job.hospitals,
            self.job.quorum,
            self.key_epoch,
        )

    # --- validation and aggregation -----------------------------------------

    def expect_model(self, server_round: int, arrays: ArrayRecord) -> None:
        """Remember the layout of the global model sent for ``server_round``.

        :meth:`configure_train` calls it; updates of that round must have the
        same tensors (names, order, shapes, dtypes). Without it the first
        accepted update sets the layout.
        """
        self._expected = {server_round: _layout_of(arrays)}

    def collect_train(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Validate every reply, aggregate the good ones, explain the rest.

        Checks, in order: message type, size (``max_update_bytes``, before
        anything is decoded), records and metrics (:meth:`TrainReply.from_message`),
        the node's enrolment (:func:`_check_identity`), one reply per hospital and
        node (:func:`_check_first_reply`), the payload kind the job's mode sends
        (:meth:`AggregationMode.parse`), the update's layout against the model
        sent (:func:`_check_layout`), its own sample weight against
        ``num-examples`` (:func:`_check_weight`), then what the aggregator checks
        (:meth:`UpdateAggregator.add`: key, epoch, job, round and ciphertext
        chunks; finite values). Every check happens before the update touches
        the sum.
        """
        collector = self.round_collector(server_round)
        for msg in replies:
            collector.add(msg)
        return collector.finish()

    def round_collector(
        self, server_round: int, unmasking: UnmaskingSession | None = None
    ) -> RoundCollector:
        """Aggregate ``server_round`` reply by reply, as the replies arrive.

        See :class:`RoundCollector`; :meth:`collect_train` is the same over a list.
        ``unmasking``: the round is masked (docs/secagg.md); every update must come
        with its shares, and the sum is corrected once the survivors answered.
        """
        return RoundCollector(self, server_round, unmasking)

    def collect_evaluate(self, server_round: int, replies: Iterable[Message]) -> Evaluations:
        """The valid evaluations, each hospital's first only; the rest are logged."""
        evals = Evaluations()
        seen: set[str] = set()
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "round %d: evaluation failed on node %d", server_round, msg.metadata.src_node_id
                )
                continue
            try:
                reply = EvalReply.from_message(msg, max_bytes=self.job.max_update_bytes)
            except FedvaultError as exc:
                log.warning("round %d: evaluation reply rejected: %s", server_round, exc)
                continue
            if mismatch := self._identity_mismatch(msg.metadata.src_node_id, reply.hospital):
                log.warning("round %d: evaluation reply rejected: %s", server_round, mismatch)
                continue
            if reply.status is ReplyStatus.OK and reply.hospital not in seen:
                try:
                    evaluation = _hospital_eval(
                        self.eval_spec,
                        reply.hospital,
                        reply.evaluation,
                        reply.accuracy,
                        reply.loss,
                        reply.samples,
                    )
                except FedvaultError as exc:
                    log.warning("round %d: evaluation reply rejected: %s", server_round, exc)
                    continue
                seen.add(reply.hospital)
                evals.add(*evaluation)
        return evals

    # --- helpers ---------------------------------------------------------------

    def _identity_mismatch(self, node: int, claimed: str) -> str | None:
        """Why ``node`` may not speak for ``claimed``, or ``None`` if it may."""
        try:
            _check_identity(self.enrolled, node, claimed)
        except MalformedUpdateError as exc:
            return str(exc)
        return None

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, message_type: str
    ) -> list[Message]:
        content = RecordDict({MODEL_KEY: arrays, CONFIG_KEY: config})
        return [
            Message(content=content, dst_node_id=node, message_type=message_type)
            for node in grid.get_node_ids()
        ]

    @staticmethod
    def _reject(
        outcome: RoundOutcome, hospital: str, node: int, reason: str, server_round: int
    ) -> None:
        log.warning("round %d: rejected update from %s: %s", server_round, hospital, reason)
        outcome.record(
            Participation(hospital=hospital, node_id=node, status="rejected", reason=reason),
        )
        outcome.audit.append(
            AuditEvent(
                kind="update_rejected",
                actor=hospital,
                detail={"round": server_round, "reason": reason},
            )
        )


class RoundCollector:
    """One training round's replies, validated and added to the sum one at a time.

    The coordinator's memory must not grow with the consortium: each reply is
    parsed, checked, folded into the running (encrypted) sum and dropped as it
    arrives, so at most one update is held at once. Adding replies in one
    batch or one by one gives a byte-identical aggregate (ciphertext addition
    is exact; plaintext sums follow arrival order either way).
    """

    def __init__(
        self,
        strategy: SecureFedAvg,
        server_round: int,
        unmasking: UnmaskingSession | None = None,
    ) -> None:
        self.strategy, self.server_round = strategy, server_round
        self.unmasking = unmasking
        self.nodes: dict[str, int] = {}  # accepted hospital -> its node (the unmask round)
        self._hospital_of: dict[int, str] = {}  # its inverse
        self.outcome = RoundOutcome()
        self.aggregator: UpdateAggregator[Any, Any] = strategy.mode.aggregator(
            strategy.public_context,
            key_epoch=strategy.key_epoch,
            job=strategy.job.job,
            server_round=server_round,
        )
        self.expected = strategy._expected.get(server_round)
        self.seen_nodes: set[int] = set()
        self.loss_sum = 0.0

    def add(self, msg: Message) -> None:
        """Validate one reply and, if it is good, add its update to the sum."""
        node = msg.metadata.src_node_id
        repeated = node in self.seen_nodes  # one reply per node and round: the first counts
        self.seen_nodes.add(node)
        if msg.has_error():
            self._failed(node, f"client error {msg.error.code}: {msg.error.reason}")
            return
        reply = self._admit(msg, node, repeated)
        if reply is None:
            return
        if reply.status is ReplyStatus.REFUSED:
            self._refused(node, reply)
            return
        try:
            self._accept(node, reply)
        except FedvaultError as exc:
            self._reject(reply.hospital, node, exc)

    def finish(self) -> RoundOutcome:
        """The round's outcome: the aggregate (if any update was good) and every reason.

        A masked round's sum is corrected first; if it cannot be, the outcome has no
        model and says why (``failure``): nothing masked is ever a model.
        """
        if self.aggregator.count and not self.outcome.failure:
            aggregate = self.aggregator.result()
            if self.unmasking is not None:
                aggregate = self._corrected(aggregate)
            if aggregate is not None:
                self.outcome.model = self.strategy.mode.payload(aggregate)
                self.outcome.total_weight = self.aggregator.total_weight
                self.outcome.train_loss = self.loss_sum / self.aggregator.total_weight
        return self.outcome

    # --- masked rounds: the unmask round trip --------------------------------------

    def unmask_queries(self) -> dict[int, UnmaskQuery]:
        """Close the collection; the unmask query for each surviving hospital's node.

        Empty (and ``outcome.failure`` set) when too many hospitals dropped.
        """
        session = self.unmasking
        if session is None or not self.aggregator.count:
            return {}
        try:
            session.close()
        except UnmaskError as exc:
            self._unmask_failed(exc)
            return {}
        job = self.strategy.job.job
        return {
            self.nodes[v]: UnmaskQuery(job, self.server_round, session.request_for(v))
            for v in session.survivors
        }

    def add_unmask(self, msg: Message) -> None:
        """Record one survivor's unmask answer; a bad one is recorded against its sender."""
        assert self.unmasking is not None
        node = msg.metadata.src_node_id
        hospital = self._hospital_of.get(node, f"node-{node}")
        try:
            answer = UnmaskAnswer.from_message(msg)
            if answer.hospital != hospital:
                raise MalformedUpdateError(
                    f"unmask answer from node {node} names {answer.hospital!r}, not {hospital!r}"
                )
            if answer.reply is None:
                raise MalformedUpdateError(f"{hospital} refused to unmask: {answer.reason}")
            if answer.reply.sender != hospital:
                raise MalformedUpdateError(
                    f"{hospital} sent {answer.reply.sender!r}'s unmask reply"
                )
            self.unmasking.add_reply(answer.reply)
        except (FedvaultError, SecAggError) as exc:
            log.warning("round %d: unmask answer rejected: %s", self.server_round, exc)
            self.outcome.audit.append(
                AuditEvent(
                    kind="unmask_rejected",
                    actor=hospital,
                    detail={"round": self.server_round, "reason": str(exc)},
                )
            )

    def _corrected(self, aggregate: bytes) -> bytes | None:
        assert self.unmasking is not None and self.strategy.public_context is not None
        try:
            correction = self.unmasking.correction_stream()
            return apply_correction(self.strategy.public_context, aggregate, correction)
        except (UnmaskError, StageError) as exc:
            self._unmask_failed(exc)
            return None

    def _unmask_failed(self, exc: SecAggError) -> None:
        log.warning("round %d: %s", self.server_round, exc)
        self.outcome.failure = f"the masked round cannot be unmasked: {exc}"
        self.outcome.audit.append(
            AuditEvent(
                kind="round_unmask_failed",
                actor="coordinator",
                detail={"round": self.server_round, "reason": str(exc)},
            )
        )

    # --- one reply ---------------------------------------------------------------

    def _admit(self, msg: Message, node: int, repeated: bool) -> TrainReply | None:
        """The reply, if it parses, its node may speak for its hospital and it is the first.

        Otherwise ``None``, the rejection recorded against the sender as far as it
        is known (the node, its enrolled hospital, the hospital it names).
        """
        actor = f"node-{node}"
        try:
            reply = TrainReply.from_message(msg, max_bytes=self.strategy.job.max_update_bytes)
            actor = self._identity_actor(node, repeated)
            _check_identity(self.strategy.enrolled, node, reply.hospital)
            actor = reply.hospital
            _check_first_reply(self.outcome, reply.hospital, node, repeated, self.server_round)
        except FedvaultError as exc:
            self._reject(actor, node, exc)
            return None
        return reply

    def _accept(self, node: int, reply: TrainReply) -> None:
        """Check an OK reply's update, add it to the sum, record the hospital's part."""
        assert reply.update is not None  # TrainReply guarantees it for OK replies
        # Build the records first: they validate too, and nothing may fail once
        # the update is in the sum.
        participation = _participation(node, reply)
        evaluation = _evaluation(self.strategy.eval_spec, reply)
        update = self.strategy.mode.parse(reply.update)
        _check_layout(self.expected, update.layout)
        _check_weight(update.weight, reply.samples)
        shares = self._shares(reply)
        self.aggregator.add(update.data, weight=float(reply.samples))
        if shares is not None:  # in the sum exactly when its shares are recorded
            assert self.unmasking is not None
            self.unmasking.add_masked(shares)
            self.nodes[reply.hospital] = node
            self._hospital_of[node] = reply.hospital
        self.loss_sum += reply.train_loss * reply.samples
        if evaluation is not None:
            self.outcome.evaluations.add(*evaluation)
        self.outcome.record(participation)

    def _shares(self, reply: TrainReply) -> MaskedShares | None:
        """A masked round's shares of ``reply``, checked; ``None`` in an unmasked round."""
        if self.unmasking is None:
            return None
        if not reply.masked_shares:
            raise MalformedUpdateError(
                f"{reply.hospital} sent an unmasked update to a masked round; left out"
            )
        shares = MaskedShares.from_bytes(reply.masked_shares.encode())
        if shares.sender != reply.hospital:
            raise MalformedUpdateError(
                f"{reply.hospital} sent {shares.sender!r}'s masked shares; left out"
            )
        try:
            self.unmasking.check_masked(shares)
        except SecAggError as exc:
            raise MalformedUpdateError(f"{reply.hospital}'s masked shares: {exc}") from exc
        return shares

    def _identity_actor(self, node: int, repeated: bool) -> str:
        """Whom a reply in another hospital's name is recorded against.

        The node's enrolled hospital, or the node itself once that hospital's row is taken.
        """
        sender = (self.strategy.enrolled or {}).get(node, f"node-{node}")
        if repeated or self.outcome.has(sender):
            sender = f"node-{node}"  # the sender's own row is already taken
        return sender

    def _failed(self, node: int, reason: str) -> None:
        log.warning("round %d: node %d failed: %s", self.server_round, node, reason)
        self.outcome.record(
            Participation(hospital=f"node-{node}", node_id=node, status="failed", reason=reason),
        )

    def _refused(self, node: int, reply: TrainReply) -> None:
        self.outcome.record(
            Participation(
                hospital=reply.hospital,
                node_id=node,
                status="refused",
                reason=reply.reason,
                code=reply.code,
            ),
        )
        self.outcome.audit.append(
            AuditEvent(
                kind="round_refused",
                actor=reply.hospital,
                detail={"round": self.server_round, "reason": reply.reason},
            )
        )

    def _reject(self, hospital: str, node: int, exc: FedvaultError) -> None:
        self.strategy._reject(self.outcome, hospital, node, str(exc), self.server_round)


def _participation(node: int, reply: TrainReply) -> Participation:
    """An accepted reply's participation record (it validates the reply's numbers)."""
    assert reply.update is not None
    return Participation(
        hospital=reply.hospital,
        node_id=node,
        status="ok",
        samples=reply.samples,
        train_loss=reply.train_loss,
        epsilon=reply.epsilon,
        delta=reply.delta,
        noise_multiplier=reply.noise_multiplier,
        sample_rate=reply.sample_rate,
        steps=reply.steps,
        accountant=reply.accountant,
        accountant_state=reply.accountant_state,
        bytes_received=reply.update.nbytes,
    )


def _evaluation(spec: EvalSpec, reply: TrainReply) -> tuple[HospitalEval, EvalResult | None] | None:
    """The hospital's evaluation of the model it received, if it sent one."""
    if not reply.eval_samples:
        return None
    return _hospital_eval(
        spec,
        reply.hospital,
        reply.evaluation,
        reply.eval_accuracy,
        reply.eval_loss,
        reply.eval_samples,
    )


# --- the checks: each raises FedvaultError with what to do --------------------------


def _check_identity(enrolled: Mapping[int, str] | None, node: int, claimed: str) -> None:
    """``node`` may speak for ``claimed``: enrolment bound it to that hospital.

    ``enrolled`` is ``None`` in a simulation: no binding.
    """
    if enrolled is None:
        return
    hospital = enrolled.get(node)
    if hospital is None:
        raise MalformedUpdateError(
            f"node {node} replied as {claimed!r} but no hospital enrolled that node; "
            "the reply is discarded (was the node registered outside fedvault?)"
        )
    if hospital != claimed:
        raise MalformedUpdateError(
            f"node {node} is enrolled as {hospital!r} but replied as {claimed!r}; the "
            f"reply is discarded: a hospital may speak only for itself (check {hospital}'s "
            "kit and data spec)"
        )


def _check_first_reply(
    outcome: RoundOutcome, hospital: str, node: int, repeated: bool, server_round: int
) -> None:
    """Only a hospital's, and a node's, first reply of a round counts."""
    if repeated or outcome.has(hospital):
        raise MalformedUpdateError(
            f"duplicate reply for round {server_round} (from {hospital}, node "
            f"{node}): only the first reply counts; discard this one"
        )


def _check_layout(expected: ModelLayout | None, got: ModelLayout) -> None:
    """The update has the tensors (and encoding) of the model sent this round.

    With no model recorded for the round, the aggregator compares updates among themselves.
    """
    if expected is not None:
        expected.check(got)


def _check_weight(sample_weight: float | None, samples: int) -> None:
    """An encrypted update's weight must be the sample count its reply reports.

    The coordinator cannot look inside the ciphertext, but it can refuse a
    weight (NaN, negative, 1e300) that disagrees with ``num-examples``, which
    :class:`TrainReply` has already bounded. ``None``: the update carries no
    weight of its own (plaintext: the reply's count is its weight).
    """
    if sample_weight is not None and sample_weight != float(samples):
        raise MalformedUpdateError(
            f"update's sample_weight {sample_weight!r} differs from the num-examples {samples} "
            "the reply reports; the hospital must weight its update by its sample count, "
            "discard this update"
        )


def _layout_of(arrays: ArrayRecord) -> ModelLayout | None:
    """The layout of a global model record; ``None`` if it cannot be read (not ours)."""
    try:
        if ENVELOPE_KEY in arrays:
            data = arrays[ENVELOPE_KEY].numpy().tobytes()
            return ModelLayout.of_envelope(parse_envelope(data))
        return ModelLayout.of_arrays(arrays)
    except FedvaultError:
        return None
