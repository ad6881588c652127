"""The coordinator's Flower strategy: FedAvg over encrypted (or plaintext) updates.

In ``he`` mode the strategy holds only the public HE context. Each hospital
has already multiplied its model by its sample count before encrypting, so
sample-weighted FedAvg reduces to a ciphertext *sum* plus a plaintext total
weight: the coordinator never divides, never decrypts, never sees a number.

Every reply is validated before it can touch the running sum (see
:meth:`SecureFedAvg.collect_train`); a rejected reply is recorded with its
reason and leaves the aggregate untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvault.config import JobConfig, SecureAggregation
from fedvault.coordinator.aggregation import PlainFedAvg
from fedvault.coordinator.records import AuditEvent, HospitalEval, Participation
from fedvault.messages import (
    CONFIG_KEY,
    MODEL_KEY,
    EvalReply,
    ModelPayload,
    ReplyStatus,
    TrainReply,
    payload_to_record,
)
from fedvault.privacy.errors import FedvaultError, InvalidConfigError
from fedvault.privacy.he import Aggregator
from fedvault.privacy.he_context import HeContext

__all__ = ["RoundOutcome", "SecureFedAvg"]

log = logging.getLogger("fedvault.coordinator")


@dataclass
class RoundOutcome:
    """The validated, aggregated result of one training round."""

    model: ModelPayload | None = None
    total_weight: float = 0.0
    train_loss: float | None = None
    participations: list[Participation] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    # Hospitals' evaluation of the model they received (the previous round's).
    evaluations: list[HospitalEval] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(p.status == "ok" for p in self.participations)


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
    """

    def __init__(
        self, *, job: JobConfig, public_context: HeContext | None, key_epoch: int = 0
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

    # --- Flower Strategy interface -------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
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
        total = sum(e.samples for e in evals)
        if not total:
            return None
        return MetricRecord(
            {
                "accuracy": sum(e.accuracy * e.samples for e in evals) / total,
                "loss": sum(e.loss * e.samples for e in evals) / total,
                "num-examples": total,
            }
        )

    def summary(self) -> None:
        log.info(
            "SecureFedAvg: mode=%s, hospitals=%d, quorum=%d, key epoch=%d",
            self.job.secure_aggregation.value,
            self.job.hospitals,
            self.job.quorum,
            self.key_epoch,
        )

    # --- validation and aggregation -----------------------------------------

    def collect_train(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Validate every reply, aggregate the good ones, explain the rest."""
        outcome = RoundOutcome()
        he = self.job.secure_aggregation is SecureAggregation.HE
        aggregator: Aggregator | PlainFedAvg
        if he:
            assert self.public_context is not None  # enforced in __init__
            aggregator = Aggregator(
                self.public_context,
                key_epoch=self.key_epoch,
                job=self.job.job,
                server_round=server_round,
            )
        else:
            aggregator = PlainFedAvg()
        seen: set[str] = set()
        loss_sum = 0.0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = f"client error {msg.error.code}: {msg.error.reason}"
                outcome.participations.append(
                    Participation(
                        hospital=f"node-{node}", node_id=node, status="failed", reason=reason
                    )
                )
                continue
            try:
                reply = TrainReply.from_message(msg)
            except FedvaultError as exc:
                self._reject(outcome, f"node-{node}", node, str(exc), server_round)
                continue
            if reply.hospital in seen:
                self._reject(
                    outcome, reply.hospital, node, "duplicate reply for this round", server_round
                )
                continue
            seen.add(reply.hospital)
            if reply.status is ReplyStatus.REFUSED:
                outcome.participations.append(
                    Participation(
                        hospital=reply.hospital, node_id=node, status="refused", reason=reply.reason
                    )
                )
                outcome.audit.append(
                    AuditEvent(
                        kind="round_refused",
                        actor=reply.hospital,
                        detail={"round": server_round, "reason": reply.reason},
                    )
                )
                continue
            assert reply.update is not None  # TrainReply guarantees it for OK replies
            try:
                if isinstance(aggregator, Aggregator):
                    if reply.update.envelope is None:
                        raise InvalidConfigError("plaintext update in an encrypted job")
                    aggregator.add(reply.update.envelope)
                else:
                    if reply.update.arrays is None:
                        raise InvalidConfigError("encrypted update in a plaintext job")
                    aggregator.add(reply.update.arrays, weight=float(reply.samples))
            except FedvaultError as exc:
                self._reject(outcome, reply.hospital, node, str(exc), server_round)
                continue
            loss_sum += reply.train_loss * reply.samples
            if reply.eval_samples:
                outcome.evaluations.append(
                    HospitalEval(
                        hospital=reply.hospital,
                        accuracy=reply.eval_accuracy,
                        loss=reply.eval_loss,
                        samples=reply.eval_samples,
                    )
                )
            outcome.participations.append(
                Participation(
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
            )
        if aggregator.count:
            if isinstance(aggregator, Aggregator):
                outcome.model = ModelPayload(envelope=aggregator.result())
            else:
                outcome.model = ModelPayload(arrays=aggregator.result())
            outcome.total_weight = aggregator.total_weight
            outcome.train_loss = loss_sum / aggregator.total_weight
        return outcome

    def collect_evaluate(self, server_round: int, replies: Iterable[Message]) -> list[HospitalEval]:
        evals: dict[str, HospitalEval] = {}
        for msg in replies:
            if msg.has_error():
                log.warning(
                    "round %d: evaluation failed on node %d", server_round, msg.metadata.src_node_id
                )
                continue
            try:
                reply = EvalReply.from_message(msg)
            except FedvaultError as exc:
                log.warning("round %d: evaluation reply rejected: %s", server_round, exc)
                continue
            if reply.status is ReplyStatus.OK and reply.hospital not in evals:
                evals[reply.hospital] = HospitalEval(
                    hospital=reply.hospital,
                    accuracy=reply.accuracy,
                    loss=reply.loss,
                    samples=reply.samples,
                )
        return list(evals.values())

    # --- helpers ---------------------------------------------------------------

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
        outcome.participations.append(
            Participation(hospital=hospital, node_id=node, status="rejected", reason=reason)
        )
        outcome.audit.append(
            AuditEvent(
                kind="update_rejected",
                actor=hospital,
                detail={"round": server_round, "reason": reason},
            )
        )
