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

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvault.config import JobConfig, SecureAggregation
from fedvault.coordinator.aggregation import PlainFedAvg
from fedvault.coordinator.records import AuditEvent, HospitalEval, Participation
from fedvault.messages import (
    CONFIG_KEY,
    ENVELOPE_KEY,
    MODEL_KEY,
    EvalReply,
    ModelPayload,
    ReplyStatus,
    TrainReply,
    payload_to_record,
)
from fedvault.metrics import EvalResult, pool
from fedvault.privacy.errors import FedvaultError, InvalidConfigError, MalformedUpdateError
from fedvault.privacy.he import Aggregator, parse_envelope
from fedvault.privacy.he_context import HeContext
from fedvault.proto import update_pb2
from fedvault.task import TaskKind

__all__ = ["EvalSpec", "Evaluations", "RoundCollector", "RoundOutcome", "SecureFedAvg"]

log = logging.getLogger("fedvault.coordinator")


@dataclass(frozen=True)
class EvalSpec:
    """What the coordinator knows of the task's metrics: enough to check and pool
    the hospitals' evaluations (:mod:`fedvault.metrics`), nothing that trains."""

    kind: TaskKind = "multiclass"
    num_classes: int = 2
    extra_metrics: tuple[str, ...] = ()

    def parse(self, text: str, hospital: str) -> EvalResult:
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
        self.hospitals.append(evaluation)
        if result is not None:
            self.results.append(result)

    def pooled(self, spec: EvalSpec) -> dict[str, float]:
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

    @property
    def accepted(self) -> int:
        return sum(p.status == "ok" for p in self.participations)

    def record(self, participation: Participation) -> bool:
        """Record a hospital's part in the round once; ``False`` if it already has one.

        The store keeps one row per hospital and round, so a second row would
        make the whole round's commit fail: a second reply in the same name (a
        duplicate, or a node that first sent garbage) is only logged and
        audited. Use this for every participation, also the ServerApp's.
        """
        if any(p.hospital == participation.hospital for p in self.participations):
            return False
        self.participations.append(participation)
        return True


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
        if job.secure_aggregation is SecureAggregation.HE:
            if public_context is None:
                raise InvalidConfigError("he mode needs the consortium's public HE context")
            if public_context.is_private:
                # The coordinator must be *unable* to decrypt, not merely unwilling.
                raise InvalidConfigError(
                    "the coordinator was given a HE context holding a secret key; "
                    "give it only the public context"
                )
        self.job = job
        self.public_context = public_context
        self.key_epoch = key_epoch
        self.enrolled = None if enrolled is None else dict(enrolled)
        self.eval_spec = eval_spec or EvalSpec()
        # Layout of the model sent for a round (see expect_model): every update
        # must match it, so a hostile first reply cannot set the layout.
        self._expected: dict[int, _ModelLayout | None] = {}

    # --- Flower Strategy interface -------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.expect_model(server_round, arrays)
        return self._messages(arrays, config, grid, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
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
        return self._messages(arrays, config, grid, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        evals = self.collect_evaluate(server_round, replies)
        total = sum(e.samples for e in evals.hospitals)
        if not total:
            return None
        pooled = {k: float(v) for k, v in evals.pooled(self.eval_spec).items()}
        pooled.setdefault("loss", sum(e.loss * e.samples for e in evals.hospitals) / total)
        return MetricRecord({**pooled, "num-examples": total})

    def summary(self) -> None:
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
        anything is decoded), records and metrics, one reply per hospital and
        node, the update's layout against the model sent, its sample weight
        against ``num-examples``, then key, epoch, job, round and ciphertext
        chunks (:meth:`Aggregator.add`). Every check happens before the update
        touches the sum.
        """
        collector = self.round_collector(server_round)
        for msg in replies:
            collector.add(msg)
        return collector.finish()

    def round_collector(self, server_round: int) -> RoundCollector:
        """Aggregate ``server_round`` reply by reply, as the replies arrive (see
        :class:`RoundCollector`); :meth:`collect_train` is the same over a list."""
        return RoundCollector(self, server_round)

    def collect_evaluate(self, server_round: int, replies: Iterable[Message]) -> Evaluations:
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
        if self.enrolled is None:
            return None
        enrolled = self.enrolled.get(node)
        if enrolled is None:
            return (
                f"node {node} replied as {claimed!r} but no hospital enrolled that node; "
                "the reply is discarded (was the node registered outside fedvault?)"
            )
        if enrolled != claimed:
            return (
                f"node {node} is enrolled as {enrolled!r} but replied as {claimed!r}; the "
                f"reply is discarded: a hospital may speak only for itself (check {enrolled}'s "
                "kit and data spec)"
            )
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

    def __init__(self, strategy: SecureFedAvg, server_round: int) -> None:
        self.strategy, self.server_round = strategy, server_round
        self.outcome = RoundOutcome()
        job = strategy.job
        self.aggregator: Aggregator | PlainFedAvg
        if job.secure_aggregation is SecureAggregation.HE:
            if strategy.public_context is None:  # enforced by SecureFedAvg.__init__
                raise InvalidConfigError("he mode needs the consortium's public HE context")
            self.aggregator = Aggregator(
                strategy.public_context,
                key_epoch=strategy.key_epoch,
                job=job.job,
                server_round=server_round,
            )
        else:
            self.aggregator = PlainFedAvg()
        self.expected = strategy._expected.get(server_round)
        self.seen_nodes: set[int] = set()
        self.loss_sum = 0.0

    def add(self, msg: Message) -> None:
        """Validate one reply and, if it is good, add its update to the sum."""
        s = self.strategy
        node = msg.metadata.src_node_id
        repeated = node in self.seen_nodes  # one reply per node and round: the first counts
        self.seen_nodes.add(node)
        if msg.has_error():
            reason = f"client error {msg.error.code}: {msg.error.reason}"
            log.warning("round %d: node %d failed: %s", self.server_round, node, reason)
            self.outcome.record(
                Participation(
                    hospital=f"node-{node}", node_id=node, status="failed", reason=reason
                ),
            )
            return
        try:
            reply = TrainReply.from_message(msg, max_bytes=s.job.max_update_bytes)
        except FedvaultError as exc:
            s._reject(self.outcome, f"node-{node}", node, str(exc), self.server_round)
            return
        if (mismatch := s._identity_mismatch(node, reply.hospital)) is not None:
            sender = (s.enrolled or {}).get(node, f"node-{node}")
            if repeated or any(p.hospital == sender for p in self.outcome.participations):
                sender = f"node-{node}"  # the sender's own row is already taken
            s._reject(self.outcome, sender, node, mismatch, self.server_round)
            return
        if repeated or any(p.hospital == reply.hospital for p in self.outcome.participations):
            s._reject(
                self.outcome,
                reply.hospital,
                node,
                f"duplicate reply for round {self.server_round} (from {reply.hospital}, node "
                f"{node}): only the first reply counts; discard this one",
                self.server_round,
            )
            return
        if reply.status is ReplyStatus.REFUSED:
            self.outcome.record(
                Participation(
                    hospital=reply.hospital, node_id=node, status="refused", reason=reply.reason
                ),
            )
            self.outcome.audit.append(
                AuditEvent(
                    kind="round_refused",
                    actor=reply.hospital,
                    detail={"round": self.server_round, "reason": reply.reason},
                )
            )
            return
        assert reply.update is not None  # TrainReply guarantees it for OK replies
        try:
            # Build the records first: they validate too, and nothing may
            # fail once the update is in the sum.
            participation = Participation(
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
            evaluation = (
                _hospital_eval(
                    s.eval_spec,
                    reply.hospital,
                    reply.evaluation,
                    reply.eval_accuracy,
                    reply.eval_loss,
                    reply.eval_samples,
                )
                if reply.eval_samples
                else None
            )
            if isinstance(self.aggregator, Aggregator):
                if reply.update.envelope is None:
                    raise MalformedUpdateError(
                        "plaintext update in an encrypted job; discard it and check the "
                        "hospital's configuration (it must encrypt its updates)"
                    )
                env = parse_envelope(reply.update.envelope)
                if self.expected is not None:
                    self.expected.check(_envelope_layout(env))
                _check_weight(env.sample_weight, reply.samples)
                self.aggregator.add(env)
            else:
                if reply.update.arrays is None:
                    raise MalformedUpdateError(
                        "encrypted update in a plaintext job; discard it and check the "
                        "hospital's configuration"
                    )
                if self.expected is not None:
                    self.expected.check(_arrays_layout(reply.update.arrays))
                self.aggregator.add(reply.update.arrays, weight=float(reply.samples))
        except FedvaultError as exc:
            s._reject(self.outcome, reply.hospital, node, str(exc), self.server_round)
            return
        self.loss_sum += reply.train_loss * reply.samples
        if evaluation is not None:
            self.outcome.evaluations.add(*evaluation)
        self.outcome.record(participation)

    def finish(self) -> RoundOutcome:
        """The round's outcome: the aggregate (if any update was good) and every reason."""
        if self.aggregator.count:
            if isinstance(self.aggregator, Aggregator):
                self.outcome.model = ModelPayload(envelope=self.aggregator.result())
            else:
                self.outcome.model = ModelPayload(arrays=self.aggregator.result())
            self.outcome.total_weight = self.aggregator.total_weight
            self.outcome.train_loss = self.loss_sum / self.aggregator.total_weight
        return self.outcome


# --- layout checks ---------------------------------------------------------------

_Spec = tuple[str, tuple[int, ...], str]  # name, shape, dtype


@dataclass(frozen=True)
class _ModelLayout:
    """Names, shapes and dtypes of a model's tensors, in packing order.

    For an envelope also its fixed-point encoding (scale and bound bits):
    summands encoded differently add up to garbage.
    """

    tensors: tuple[_Spec, ...]
    encoding: tuple[int, int] | None = None

    def check(self, got: _ModelLayout) -> None:
        if got == self:
            return
        if got.tensors == self.tensors:
            raise MalformedUpdateError(
                f"update's fixed-point encoding (scale bits, bound bits) = {got.encoding} "
                f"differs from the model sent this round, {self.encoding}; run the same "
                "fedvault version and settings at every site, discard this update"
            )
        for i, (g, w) in enumerate(zip(got.tensors, self.tensors, strict=False)):
            if g != w:
                diff = f"tensor {i} is {g[0]!r} {g[1]} {g[2]}, expected {w[0]!r} {w[1]} {w[2]}"
                break
        else:
            diff = f"{len(got.tensors)} tensors, expected {len(self.tensors)}"
        raise MalformedUpdateError(
            f"update's layout differs from the model sent this round: {diff}; the hospital "
            "runs another model version, discard this update"
        )


def _envelope_layout(env: update_pb2.UpdateEnvelope) -> _ModelLayout:
    return _ModelLayout(
        tuple((t.name, tuple(int(d) for d in t.shape), t.dtype) for t in env.layout.tensors),
        (env.scale_bits, env.value_bound_bits),
    )


def _arrays_layout(arrays: Mapping[str, np.ndarray]) -> _ModelLayout:
    return _ModelLayout(tuple((k, tuple(v.shape), str(v.dtype)) for k, v in arrays.items()))


def _layout_of(arrays: ArrayRecord) -> _ModelLayout | None:
    """The layout of a global model record; ``None`` if it cannot be read (not ours)."""
    try:
        if ENVELOPE_KEY in arrays:
            data = arrays[ENVELOPE_KEY].numpy().tobytes()
            return _envelope_layout(parse_envelope(data))
        return _ModelLayout(tuple((k, tuple(a.shape), str(a.dtype)) for k, a in arrays.items()))
    except FedvaultError:
        return None


def _check_weight(sample_weight: float, samples: int) -> None:
    """An encrypted update's weight must be the sample count its reply reports.

    The coordinator cannot look inside the ciphertext, but it can refuse a
    weight (NaN, negative, 1e300) that disagrees with ``num-examples``, which
    :class:`TrainReply` has already bounded.
    """
    if sample_weight != float(samples):
        raise MalformedUpdateError(
            f"update's sample_weight {sample_weight!r} differs from the num-examples {samples} "
            "the reply reports; the hospital must weight its update by its sample count, "
            "discard this update"
        )
