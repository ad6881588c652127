"""The coordinator aggregates each reply as it arrives and keeps none of them.

Its memory must not grow with the consortium: the ServerApp pulls replies a
few at a time (:data:`server_app._PULL_BATCH`) and folds each into the running
encrypted sum (:class:`RoundCollector`). These tests check that the aggregate
does not depend on how the replies arrive (all at once, one by one, in any
order: ciphertext addition is exact) and that the ServerApp never asks the
SuperLink for more replies at once than the batch.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType, Metadata, RecordDict

from fedvault.config import JobConfig, TrainingConfig
from fedvault.coordinator import server_app
from fedvault.coordinator.server_app import CoordinatorSettings, _RoundRunner
from fedvault.coordinator.strategy import SecureFedAvg
from fedvault.messages import ModelPayload, ReplyStatus, TrainReply, payload_to_record
from fedvault.privacy.dp import PrivacyConfig
from fedvault.privacy.he import encrypt_update
from fedvault.privacy.he_context import HeContext
from fedvault.task_registry import load_task

HOSPITALS = {f"hospital-{i}": (100 + i, 40 + 17 * i) for i in range(1, 8)}  # node, samples
JOB = JobConfig(
    job="streaming",
    task="breast-cancer",
    hospitals=len(HOSPITALS),
    rounds=3,
    privacy=PrivacyConfig(epsilon=3.0, delta=1e-5),
    training=TrainingConfig(batch_size=8, learning_rate=0.1),
    round_timeout_s=30.0,
)


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((30, 150)).astype(np.float32), "b": rng.standard_normal(50)}


@dataclass
class World:
    ctx: HeContext = field(default_factory=HeContext.generate)

    def __post_init__(self) -> None:
        self.pub = self.ctx.public()
        self.initial = encrypt_update(self.pub, _update(0), weight=1.0, key_epoch=0, job=JOB.job)
        self.envelopes = {
            name: encrypt_update(
                self.ctx, _update(node), weight=float(n), key_epoch=0, job=JOB.job, server_round=1
            )
            for name, (node, n) in HOSPITALS.items()
        }

    def reply(self, name: str, reply_to: str = "") -> Message:
        node, samples = HOSPITALS[name]
        content = TrainReply(
            hospital=name,
            status=ReplyStatus.OK,
            update=ModelPayload(envelope=self.envelopes[name]),
            samples=samples,
            train_loss=0.3,
            epsilon=0.5,
            delta=1e-5,
            noise_multiplier=1.0,
            sample_rate=0.5,
            steps=2,
            round_steps=2,
            accountant="prv",
            accountant_state=json.dumps({"history": [[1.0, 0.5, 2]]}),
        ).to_content()
        metadata = Metadata(
            run_id=1,
            message_id=uuid.uuid4().hex,
            src_node_id=node,
            dst_node_id=1,
            reply_to_message_id=reply_to or f"train-{node}",
            group_id="",
            created_at=0.0,
            ttl=60.0,
            message_type=MessageType.TRAIN,
        )
        return Message(content=content, metadata=metadata)

    def strategy(self) -> SecureFedAvg:
        s = SecureFedAvg(job=JOB, public_context=self.pub, key_epoch=0)
        s.expect_model(1, payload_to_record(ModelPayload(envelope=self.initial)))
        return s


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _aggregate(world: World, batches: Iterable[list[str]]) -> bytes:
    collector = world.strategy().round_collector(1)
    for batch in batches:
        for name in batch:
            collector.add(world.reply(name))
    outcome = collector.finish()
    assert outcome.accepted == len(HOSPITALS) and outcome.model is not None
    assert outcome.model.envelope is not None
    return outcome.model.envelope


def test_the_aggregate_is_byte_identical_however_replies_arrive(world: World) -> None:
    names = list(HOSPITALS)
    all_at_once = world.strategy().collect_train(1, [world.reply(n) for n in names])
    assert all_at_once.model is not None and all_at_once.model.envelope is not None
    expected = all_at_once.model.envelope
    assert _aggregate(world, [[n] for n in names]) == expected  # one by one
    assert _aggregate(world, [names[:3], names[3:]]) == expected  # in two bursts
    assert _aggregate(world, [[n] for n in reversed(names)]) == expected  # another order


def _instruction(node: int) -> Message:
    """A train instruction to ``node`` (metadata as a ServerApp's grid fills it)."""
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=1,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=RecordDict({}), metadata=metadata)


class _TrickleGrid:
    """A Grid whose replies arrive one per pull (the slowest possible consortium).

    Records the ids asked for in each pull, so the test can check the ServerApp
    never asks for more replies at once than its batch.
    """

    def __init__(self, respond: Callable[[int, str], Message]) -> None:
        self.respond = respond
        self.pending: dict[str, int] = {}
        self.pulls: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [node for node, _ in HOSPITALS.values()]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            self.pending[msg.metadata.message_id] = msg.metadata.dst_node_id
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids = list(message_ids)
        self.pulls.append(len(ids))
        for msg_id in ids:
            if msg_id in self.pending:
                return [self.respond(self.pending.pop(msg_id), msg_id)]
        return []


def test_the_server_app_pulls_a_few_replies_at_a_time_and_adds_each_at_once(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_app, "_POLL_S", 0.0)
    names = {node: name for name, (node, _) in HOSPITALS.items()}
    added: list[str] = []
    grid = _TrickleGrid(lambda node, msg_id: world.reply(names[node], reply_to=msg_id))
    settings = CoordinatorSettings(
        job=JOB, store_url="sqlite://", task=load_task("breast-cancer"), public_context=world.pub
    )
    runner = _RoundRunner(grid, settings, None, 1)  # type: ignore[arg-type]
    collector = world.strategy().round_collector(1)

    def add(msg: Message) -> None:
        added.append(names[msg.metadata.src_node_id])
        collector.add(msg)

    messages = [_instruction(node) for node in grid.get_node_ids()]
    missing = runner._exchange(messages, add)
    assert missing == {}
    assert sorted(added) == sorted(HOSPITALS)
    assert max(grid.pulls) <= server_app._PULL_BATCH < len(HOSPITALS)
    outcome = collector.finish()
    all_at_once = world.strategy().collect_train(1, [world.reply(n) for n in HOSPITALS])
    assert outcome.model == all_at_once.model  # byte-identical ciphertext sum


def test_a_node_that_never_answers_is_reported_missing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_app, "_POLL_S", 0.01)
    silent = HOSPITALS["hospital-3"][0]
    names = {node: name for name, (node, _) in HOSPITALS.items()}

    class Silent(_TrickleGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
            ids = [i for i in message_ids if self.pending.get(i) != silent]
            return super().pull_messages(ids) if ids else []

    grid = Silent(lambda node, msg_id: world.reply(names[node], reply_to=msg_id))
    job = JobConfig.from_dict({**JOB.to_dict(), "round_timeout_s": 1.0})
    settings = CoordinatorSettings(
        job=job, store_url="sqlite://", task=load_task("breast-cancer"), public_context=world.pub
    )
    runner = _RoundRunner(grid, settings, None, 1)  # type: ignore[arg-type]
    messages = [_instruction(node) for node in grid.get_node_ids()]
    got: list[Message] = []
    missing = runner._exchange(messages, got.append)
    assert missing == {silent: "no reply within 1 s"}
    assert len(got) == len(HOSPITALS) - 1
